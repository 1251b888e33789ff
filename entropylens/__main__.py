from entropylens.cli.commands import main

main()
