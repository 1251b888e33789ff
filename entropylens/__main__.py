from entropylens.cli import main

main()
