# Two commands matter: `make demo` and `make test`. Both install what they need first.
# Uses the active virtual environment when there is one, otherwise creates .venv.
ifdef VIRTUAL_ENV
PYTHON := $(VIRTUAL_ENV)/bin/python
else
PYTHON := .venv/bin/python
endif
# The CPU build of torch on these machines; GPU users override it (or install their own torch first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(dir $(PYTHON)).sdistill-installed
PYTEST_ARGS ?=

.PHONY: install lint test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x "$(PYTHON)" ] || python3 -m venv .venv
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	@# Keep the installed torch: extras must not pull another build (and its CUDA wheels).
	@$(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $(dir $(PYTHON)).torch-constraint.txt
	$(PYTHON) -m pip install -q -c $(dir $(PYTHON)).torch-constraint.txt -e ".[dev,weights,diffusers,digits]"
	@touch $@

# ruff, configured in pyproject.toml: lint rules and the format check.
lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: install
	$(PYTHON) -m pytest -q -n 2 $(PYTEST_ARGS)

# The quick start: teacher trajectories -> DLMS at NFE 5 -> samples with it (about a minute on 2 CPU cores;
# a 128 MB cache in cache/quickstart_small; README "Quick start" has the measured figures).
# One thread: the demo's tensors are small, and on a busy machine two threads that wait for each other ran 5x
# slower (20 DLMS iterations: 141 s with two threads, 28 s with one, while other jobs used the cores).
DEMO_THREADS ?= 1
demo: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill teacher recipes/quickstart.yaml
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill distill recipes/quickstart.yaml
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill sample --solver out/quickstart_dlms_nfe5.npz \
		--num 64 --seed 1000000 --out out/demo
	@echo "out/demo/grid.png: 64 samples of gmm:cifar by the distilled DLMS solver at NFE 5 (seeds 1000000..1000063)"
	@echo "next: sdistill compare --recipe recipes/quickstart.yaml --solvers euler+afs,dpm++,ipndm,out/quickstart_dlms_nfe5.npz --nfe 5,8,10,15"

bench: install
	$(PYTHON) -m solverdistill bench

clean:
	rm -rf out .pytest_cache

# The digits demo (docs/digits.md): teacher -> DLMS at NFE 5 -> samples on toy:unet-digits, a network trained on
# real handwritten digits; prints the FD of the DLMS samples next to the best handcrafted solver at NFE 5.
# One thread each: on a busy 2-core machine two threads per process fight and run several times slower.
.PHONY: demo-digits
demo-digits: export OMP_NUM_THREADS ?= 1
demo-digits: install
	$(PYTHON) -m solverdistill teacher recipes/digits_dlms.yaml
	$(PYTHON) -m solverdistill distill recipes/digits_dlms.yaml
	$(PYTHON) -m solverdistill sample --solver out/digits_dlms_nfe5.npz --num 512 --batch 256 --seed 1000000 --out out/demo-digits --quiet
	$(PYTHON) -m solverdistill.digits demo out/demo-digits/samples.npz
	@echo "sample grid: out/demo-digits/grid.png"
