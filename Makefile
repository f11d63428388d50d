# The front door. Each target stays thin: real work lives in lora_sweep/ and sweep.py.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo tiny-model test test-fast lint table article compare ui bench bench-gpu gpu-check bench-sdxl cache-clean clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps hydra-ray-launcher==1.2.2
	touch $(STAMP)

install: $(STAMP)

# The article's twelve variants at demo scale, two seeds each (the report's intervals come from the replicates).
demo: $(STAMP)
	$(BIN)/python sweep.py -m preset=demo train.seed=1,2

# Retrain model=tiny into lora_sweep/assets/tiny_trained (+ .json): seeded, about 50 CPU minutes (docs/tiny-models.md).
tiny-model: $(STAMP)
	OMP_NUM_THREADS=$(or $(THREADS),1) $(BIN)/python -m lora_sweep tiny-model $(ARGS)

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check .

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

table: $(STAMP)
	$(BIN)/python -m lora_sweep table $(if $(FORMAT),--format $(FORMAT))

article: $(STAMP)
	@test -n "$(MODEL)" -a -n "$(DATA)" || { echo "make article needs MODEL=/path/to/sdxl (a diffusers folder or .safetensors) and DATA=/path/to/dataset (kohya layout: <repeats>_<name>/ folders)"; exit 2; }
	$(BIN)/python sweep.py -m 'experiment=glob(v*)' model=sdxl model.path=$(MODEL) data=folder data.dir=$(DATA) $(ARGS)

compare: $(STAMP)
	$(BIN)/python -m lora_sweep compare $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI)) $(ARGS)

ui: $(STAMP)
	$(BIN)/python -m lora_sweep ui $(if $(TRACKING_URI),--tracking-uri $(TRACKING_URI)) $(if $(PORT),--port $(PORT)) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

bench: $(STAMP)
	$(BIN)/python -m benchmarks.cpu $(ARGS)

bench-gpu: $(STAMP)
	$(BIN)/python -m benchmarks.gpu $(ARGS)

# On a machine with a GPU: the tests that need CUDA (skipped elsewhere: full fp16, inductor compile, paged
# optimizer state, sampling's offload) and then the GPU benchmark, as one run.
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -rs tests/training/test_switches_cuda.py \
		tests/training/test_optim.py tests/training/test_loss.py tests/sampling/test_sampling.py
	$(MAKE) bench-gpu

# SDXL base's real architecture with random weights (built once into the cache, ~6.9 GB): memory, load, steps, files.
bench-sdxl: $(STAMP)
	$(BIN)/python -m benchmarks.sdxl $(ARGS)

cache-clean: $(STAMP)
	$(BIN)/python -m lora_sweep cache clean

clean:
	rm -rf outputs multirun mlruns mlflow.db
