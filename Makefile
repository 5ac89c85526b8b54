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

.PHONY: install lint test demo demo-gmm bench clean

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

# The demo (README "Quick start"): on toy:unet-digits, a network trained on real handwritten digits, teacher ->
# DLMS at NFE 5 -> 512 samples; prints their FD next to the best handcrafted solver's at NFE 5 (same seeds) and
# draws both (out/demo/grid.png). The handcrafted solvers need neither the teacher nor the student, so they run on
# the second core meanwhile (out/demo/handcrafted.log). One torch thread per process: on this 2-core machine two
# threads per process ran the network 3x slower (README "Quick start" has the measurements).
DEMO_THREADS ?= 1
DEMO_SEEDS := --num 512 --seed 1000000
demo: install
	@mkdir -p out/demo
	@echo "background: python -m solverdistill.digits handcrafted --nfe 5 $(DEMO_SEEDS) --out out/demo/handcrafted.npz"
	@OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill.digits handcrafted --nfe 5 $(DEMO_SEEDS) \
		--out out/demo/handcrafted.npz > out/demo/handcrafted.log 2>&1 & hand=$$!; \
	trap 'kill $$hand 2>/dev/null' INT TERM; \
	run() { echo "sdistill $$*"; OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill "$$@"; }; \
	if ! { run teacher recipes/digits_demo.yaml && run distill recipes/digits_demo.yaml && \
		run sample --solver out/digits_demo_dlms_nfe5.npz $(DEMO_SEEDS) --batch 256 --out out/demo --quiet; }; \
	then kill $$hand 2>/dev/null; exit 1; fi; \
	wait $$hand || { cat out/demo/handcrafted.log; exit 1; }
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill.digits demo out/demo/samples.npz \
		--handcrafted out/demo/handcrafted.npz --picture out/demo/grid.png
	@echo "next: sdistill compare --model toy:unet-digits --solvers ddim,dpm++,dlms --nfe 4,5 --num 512 --metric digits (finds this DLMS at NFE 5, distills one at NFE 4 with recipes/digits_demo.yaml; without --metric it adds the RMSE against an RK4 solve, minutes more)"
	@echo "next: make demo-gmm (the analytic-model quick start), then README \"Real images\" and docs/digits.md"

# The earlier quick start on the analytic image model gmm:cifar: teacher -> DLMS at NFE 5 -> samples (about a
# minute on 2 CPU cores; a 128 MB cache in cache/quickstart_small).
demo-gmm: install
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill teacher recipes/quickstart.yaml
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill distill recipes/quickstart.yaml
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PYTHON) -m solverdistill sample --solver out/quickstart_dlms_nfe5.npz \
		--num 64 --seed 1000000 --out out/demo-gmm
	@echo "out/demo-gmm/grid.png: 64 samples of gmm:cifar by the distilled DLMS solver at NFE 5 (seeds 1000000..1000063)"
	@echo "next: sdistill compare --recipe recipes/quickstart.yaml --solvers euler+afs,dpm++,ipndm,out/quickstart_dlms_nfe5.npz --nfe 5,8,10,15"

bench: install
	$(PYTHON) -m solverdistill bench

clean:
	rm -rf out .pytest_cache
