# Kiln: `make demo` compiles the example models; `make test` runs the test suite.
# Both create .venv in the repository root when missing and install everything into it.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kiln-installed
PYTEST ?= -q

.PHONY: all install demo test test-slow bench-smoke fuzz onnx-conformance opinfo suite clean

all: demo

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Reinstall when the pins, the build description or the C++ sources change.
$(STAMP): $(PY) requirements.txt pyproject.toml CMakeLists.txt $(wildcard csrc/*)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m kiln.cli demo resnet18 bert lstm

test: $(STAMP)
	$(PY) -m pytest $(PYTEST) -p no:logging tests

test-slow: $(STAMP)
	$(PY) -m pytest $(PYTEST) -p no:logging -m slow tests

# The benchmarks run end to end on their quick settings and write well-formed output
# (nothing about speed is asserted): tests marked `bench`, kept out of `make test` for their
# run time. .ci/run runs both.
bench-smoke: $(STAMP)
	$(PY) -m pytest $(PYTEST) -p no:logging -m bench tests

# A bigger fuzzing budget than the default suite's 200 graphs: make fuzz N=2000 [START=200]
N ?= 1000
START ?= 200
fuzz: $(STAMP)
	KILN_FUZZ_N=$(N) KILN_FUZZ_START=$(START) $(PY) -m pytest $(PYTEST) -p no:logging tests/fuzz/test_fuzz.py

# ONNX's own backend node tests on every op Kiln claims: pass / fail / not-supported counts
onnx-conformance: $(STAMP)
	$(PY) tests/conformance/onnx_node_tests.py -v

# PyTorch's OpInfo database as a differential sweep (every float32 CPU sample; tests run a slice)
opinfo: $(STAMP)
	$(PY) tests/conformance/opinfo_sweep.py

# The Hugging Face model suite against eager and Inductor (one thread; see kiln bench suite --help)
suite: $(STAMP)
	$(PY) -m kiln.bench.suite --threads 1

clean:
	rm -rf build dist *.egg-info
