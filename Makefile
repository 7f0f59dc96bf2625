# onedc: two commands do all the set-up.
#   make train   venv + install + the full 3-stage curriculum on the embedded sample photos (tiny preset)
#   make test    venv + install + the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# This pair lies on local disk on the CI machines; on your GPU box override it, e.g.
#   make setup TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS ?= test,samples,deepspeed,data,anchors,paper
STAMP  := $(VENV)/.onedc-installed
ARGS   ?=

.PHONY: setup train test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# The tiny preset fine-tunes without LPIPS (its AlexNet weights cannot ship offline; see
# configs/model/tiny.yaml). With the file: ARGS="stage.finetune.lpips_weight=0.625 stage.finetune.lpips.weights=/path"
train: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python train.py stage=all $(ARGS)

# One pytest worker per core (each test runs on one thread; see tests/conftest.py); a test file
# stays on one worker, and runs several files share are built once (tests/shared_runs.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: $(STAMP)
	for b in benchmarks/*.py; do HF_HUB_OFFLINE=1 $(BIN)/python $$b || exit 1; done

clean:
	rm -rf runs .pytest_cache
