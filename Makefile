# The front door. `make setup` builds .venv; `make test` runs the offline CPU test suite.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: setup test test-docs test-fast demo demo-tiny toy-prior bench-sampling bench-training bench-data-scan tiny-prior sample-tiny reproduce-tables gpu-wheels gpu-check gpu-check-smoke check-sd15 image gcp-examples clean mutation reproduce-seeds gallery toy-gallery

setup: $(BIN)/ccp-sample

$(BIN)/ccp-sample: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install --quiet "setuptools<81" wheel -c constraints.txt
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $@

# pytest-xdist: TEST_WORKERS processes (one torch thread each, tests/conftest.py), each test file whole on one
# worker, the multi-process (DDP, torchrun) and RSS/throughput files in shared groups (tests/conftest.py says why).
# Measured back to back on 2 cores (AMD EPYC, otherwise near idle): 72 tests of 6 files with test_training_ddp.py,
# serial 78 s and 73 s, -n 2 68 s and 68 s; 80 tests of 8 single-process files, serial 97 s, -n 2 93 s.
# The whole suite with -n 2: 1,273 tests in 11 min 16 s (the serial 1,154 took 19 min 16 s, docs/tests.md).
# TEST_WORKERS=0 runs serially in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(BIN)/python -m pytest -q -m "not docs" $(XDIST)

# Every shell block of README.md and docs/*.md, run as written against stand-ins (tests/doc_commands.py lists
# what a CPU changes); blocks the CI cannot run say why in the markdown. CI runs it after make test.
test-docs: setup
	$(BIN)/python -m pytest -q -m docs tests/test_doc_commands.py

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not docs" $(XDIST)

# The main job at toy scale (ccp/toy/demo.py): train (or reuse) the toy prior on captioned plain digits,
# train a null-text concept model on unlabeled bold digits, write outputs/demo/grid.png.
# 2 torch threads: fastest on an otherwise idle 2-core machine, and the same as reproduce-tables SCALE=toy
# (a prior trained with another thread count differs numerically, and both share outputs/toy/prior).
# DEMO_THREADS=1 when something else is running (2 threads under contention were 4.7x slower).
DEMO_THREADS ?= 2
demo: setup
	$(BIN)/python -m ccp.toy.demo --out outputs/demo --prior outputs/toy/prior --threads $(DEMO_THREADS)

toy-prior: setup
	$(BIN)/python -m ccp.toy.prior outputs/toy/prior

# GCFG on the random offline tiny prior (no training): prior alone and concept + control prompt.
demo-tiny: setup
	$(BIN)/ccp-tiny-prior outputs/demo-tiny/prior --seed 0
	$(BIN)/ccp-null-text outputs/demo-tiny/prior outputs/demo-tiny/concept
	$(BIN)/ccp-sample prior.path=outputs/demo-tiny/prior guidance=cfg sampling.num_images=8 sampling.steps=25 hydra.run.dir=outputs/demo-tiny/prior_only
	$(BIN)/ccp-sample prior.path=outputs/demo-tiny/prior concept.path=outputs/demo-tiny/concept guidance=concept_control \
		sampling.num_images=8 sampling.steps=25 hydra.run.dir=outputs/demo-tiny/concept_control

tiny-prior: setup
	$(BIN)/ccp-tiny-prior outputs/tiny-prior --seed 0 --with-controlnet

sample-tiny: tiny-prior
	$(BIN)/ccp-sample prior.path=outputs/tiny-prior

bench-sampling: setup
	$(BIN)/python benchmarks/sampling.py --out benchmarks/results $(ARGS)

bench-training: setup
	$(BIN)/python benchmarks/training.py --out benchmarks/results $(ARGS)

# The first scan of an FFHQ-size folder (benchmarks/data_scan.py): 70,000 512x512 JPEGs generated once into
# outputs/scan-bench (about 2.7 GB), the first scan, a scan SIGKILLed at half and resumed, and the scan before
# the header checks; writes benchmarks/results/data_scan_cpu.json. ARGS="--n 5000" for a quick run.
bench-data-scan: setup
	$(BIN)/python benchmarks/data_scan.py --out benchmarks/results $(ARGS)

# SD v1.5 size on this CPU (benchmarks/check_sd15.py, docs/memory.md): random weights, one process per case, each
# method's bf16-autocast training step at 256 px (ours and dreambooth with 8-bit AdamW and gradient checkpointing)
# and a 2-step three-term GCFG sample at 512 px; fails on an error, a non-finite loss or a peak RSS over 22 GiB.
# About 5 min on 2 cores; writes benchmarks/results/check_sd15_cpu.json. Run it alone: it peaks near 12 GiB.
check-sd15: setup
	$(BIN)/python benchmarks/check_sd15.py $(ARGS)

# make gpu-check: one prepared run on a CUDA machine without network (benchmarks/gpu_check.py, docs/benchmarks.md):
# ccp-train and ccp-eval at SD v1.5 size first, then the isolated sampling and training measurements and
# the recipe's device-hours, in < 8 min, into DIR/gpu_check_<gpu>.json (ARGS="--out DIR"). It runs the
# machine's own python3 (no .venv), with ccp from this checkout. That Python is assumed to have torch, lightning, transformers (so huggingface_hub, safetensors,
# regex, Pillow, numpy, filelock, PyYAML, packaging, tqdm), peft (so accelerate) and torchmetrics;
# transformers 5 and huggingface_hub 1.x no longer bring requests, which diffusers checks for at import: carried.
# `make gpu-wheels`, run where the package index is reachable, puts the rest into .whl/ as wheels, pinned
# as in constraints.txt (tests/test_gpu_check.py checks that). No importlib_metadata: diffusers uses the
# standard library's on Python >= 3.8. A requirement with no wheel on the index (antlr4-python3-runtime
# 4.9.3 is an sdist only) is built here with `pip wheel` (all of those are pure Python). bitsandbytes (8-bit
# AdamW of preset=gpu_24gb, with its CUDA 13 library) is the largest: .whl/ is ~51 MB of the 64 MiB a run carries.
GPU_WHEELS := diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 \
	clip-anytorch==2.6.0 torch-fidelity==0.4.0 ftfy==6.3.1 wcwidth==0.9.4 \
	requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.2 certifi==2026.10.18 bitsandbytes==0.50.2
GPU_PY ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_SITE ?= /tmp/site

gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	for req in $(GPU_WHEELS); do \
		$(GPU_PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) --implementation cp \
			--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
			-d .whl $$req 2>/dev/null || $(GPU_PY) -m pip wheel -q --no-deps -w .whl $$req || exit 1; \
	done
	ls .whl && du -sh .whl

gpu-check:
	if [ -d .whl ]; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl || exit 1; \
	else echo "make gpu-check: no .whl/ beside the Makefile: checking that $(GPU_PY) has every package without it" >&2; \
		PYTHONPATH=$(GPU_SITE):. $(GPU_PY) benchmarks/gpu_check.py --preflight-only || { echo "make gpu-check: STOPPED before any section: packages missing and no .whl/ (make gpu-wheels where the package index is reachable, then carry .whl)" >&2; exit 1; }; fi
	PYTHONPATH=$(GPU_SITE):. $(GPU_PY) benchmarks/gpu_check.py $(ARGS)

# The same code path at tiny size on the CPU in well under a minute (tests/test_gpu_check.py runs it too).
gpu-check-smoke: setup
	$(BIN)/python benchmarks/gpu_check.py --smoke --out outputs/gpu-check-smoke $(ARGS)

# make gpu-rehearsal: before a GPU window, the GPU machine's software on this CPU. A Python 3.12 venv holds that
# machine's own packages (benchmarks/gpu_machine_versions.txt; torch as the CPU build of the same release), then
# make gpu-wheels and make gpu-check run as they will there (--smoke: tiny sizes), with that venv's python as
# GPU_PY, so a wheel missing from .whl or code that needs a newer torch, numpy or transformers fails here first.
# Last, the entry points a window may use (tiny prior, null-text, sample, 2 training steps) on the same stack.
# Not part of make test (it downloads); tests/test_gpu_rehearsal.py checks what it installs.
GPU_REHEARSAL_PY ?= python3.12
GPU_REHEARSAL_VENV ?= .venv-gpu312
GPU_REHEARSAL_OUT ?= outputs/gpu-rehearsal
GPU_REHEARSAL_TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
GPU_REHEARSAL_VERSIONS := benchmarks/gpu_machine_versions.txt
GPU_REHEARSAL_SITE := $(GPU_REHEARSAL_VENV)/gpu-site
GPU_REHEARSAL_RUN := HF_HUB_OFFLINE=1 PYTHONPATH=$(GPU_REHEARSAL_SITE):. $(GPU_REHEARSAL_VENV)/bin/python
# torch and its siblings first, without dependencies, so the CPU index serves only them (the rest from the usual one)
GPU_REHEARSAL_TORCH := $(shell grep -E '^(torch|torchvision|torchaudio)==' $(GPU_REHEARSAL_VERSIONS))

.PHONY: gpu-rehearsal
gpu-rehearsal:
	@test -x $(GPU_REHEARSAL_VENV)/bin/python || $(GPU_REHEARSAL_PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' \
		>/dev/null 2>&1 || { echo "make gpu-rehearsal: '$(GPU_REHEARSAL_PY)' does not run a Python 3.12, the GPU machine's;" \
		"name one with GPU_REHEARSAL_PY=..." >&2; exit 1; }
	test -x $(GPU_REHEARSAL_VENV)/bin/python || $(GPU_REHEARSAL_PY) -m venv $(GPU_REHEARSAL_VENV)
	$(GPU_REHEARSAL_VENV)/bin/pip install -q --no-deps --retries 2 --extra-index-url $(GPU_REHEARSAL_TORCH_INDEX) $(GPU_REHEARSAL_TORCH)
	$(GPU_REHEARSAL_VENV)/bin/pip install -q -r $(GPU_REHEARSAL_VERSIONS)
	$(MAKE) --no-print-directory gpu-wheels GPU_PY=$(GPU_REHEARSAL_VENV)/bin/python
	rm -rf $(GPU_REHEARSAL_SITE) $(GPU_REHEARSAL_OUT)
	$(MAKE) --no-print-directory gpu-check GPU_PY=$(GPU_REHEARSAL_VENV)/bin/python GPU_SITE=$(GPU_REHEARSAL_SITE) \
		ARGS="--smoke --out $(GPU_REHEARSAL_OUT)"
	$(GPU_REHEARSAL_RUN) -m ccp.cli.tiny_prior $(GPU_REHEARSAL_OUT)/prior --seed 0
	$(GPU_REHEARSAL_RUN) -m ccp.cli.null_text $(GPU_REHEARSAL_OUT)/prior $(GPU_REHEARSAL_OUT)/concept
	$(GPU_REHEARSAL_RUN) -m ccp.cli.sample prior.path=$(GPU_REHEARSAL_OUT)/prior concept.path=$(GPU_REHEARSAL_OUT)/concept \
		guidance=concept_control device=cpu sampling.num_images=4 sampling.batch_size=2 sampling.steps=2 \
		sampling.height=64 sampling.width=64 hydra.run.dir=$(GPU_REHEARSAL_OUT)/sample
	$(GPU_REHEARSAL_RUN) -m ccp.cli.train prior=tiny prior.path=$(GPU_REHEARSAL_OUT)/prior data=tiny \
		data.path=$(GPU_REHEARSAL_OUT)/sample/images trainer=cpu trainer.max_steps=2 trainer.global_batch_size=2 \
		data.batch_size=2 checkpoint.every_n_steps=2 validation.every_n_steps=0 logger=none \
		paths.log_dir=$(GPU_REHEARSAL_OUT)/runs
	@echo "make gpu-rehearsal: passed on the GPU machine's versions ($(GPU_REHEARSAL_OUT))"

# Tables 1-2 and Figs. 8-10 (ccp-reproduce, ccp/conf/scale/$(SCALE).yaml): tiny = offline CPU smoke run (< 3 min),
# toy = the digits reproduction into experiments/toy/results (docs/toy.md; 23 min with the toy prior cached),
# full = the paper's evaluation on trained SD v1.5 models (docs/evaluation.md). Extra settings: ARGS="key=value ...".
SCALE ?= tiny
reproduce-tables: setup
	$(BIN)/ccp-reproduce scale=$(SCALE) $(ARGS)

# The container of every launcher (gcp/Dockerfile): CUDA PyTorch base, constraints.txt pins, ccp's wheel.
IMAGE ?= ccp:latest
image:
	@command -v docker >/dev/null 2>&1 || { echo "make image: docker is not installed here; build where Docker exists (or with Cloud Build: gcloud builds submit)" >&2; exit 1; }
	docker build -f gcp/Dockerfile -t $(IMAGE) .

# The committed dry runs of the full recipe (job=reproduce) for each ccp-launch target: gcp/examples/<target>.
# The evaluations load these weights, which ccp-launch requires (tests/test_launch.py reads this line).
GCP_EXAMPLES_ARGS := weights.inception=gs://my-bucket/ccp/checkpoints/weights-inception-2015-12-05-6726825d.pth \
	weights.clip=gs://my-bucket/ccp/checkpoints/ViT-L-14.pt
gcp-examples: setup
	for target in slurm vertex gke; do \
		rm -rf gcp/examples/$$target && $(BIN)/ccp-launch target=$$target job=reproduce $(GCP_EXAMPLES_ARGS) dry_run=true \
			out_dir=gcp/examples/$$target >/dev/null || exit 1; \
	done

clean:
	rm -rf outputs multirun .pytest_cache

# Mutation testing (mutmut, pyproject [tool.mutmut]): mutants of ccp/guidance, ccp/models, ccp/training/module.py and
# the metric modules, each run against the fast tests that reach it; writes benchmarks/results/mutation/report.md
# (score, per-file counts, survivors with their reasons from benchmarks/results/mutation/reasons.json).
# Runs in a copy under outputs/mutation (mutmut writes a mutants/ folder there); rerunning resumes where it stopped.
# All 3,240 mutants took 10 min from a fresh outputs/mutation on 2 otherwise idle cores with MUTATION_JOBS=2 (mutmut
# keeps each verdict until the mutated function or the test selection changes: delete outputs/mutation for a clean
# run after editing tests). MUTANTS="ccp.guidance.*" (mutmut name globs) narrows a run (and reruns those mutants even
# when they already have a result).
MUTATION_DIR ?= outputs/mutation
MUTATION_JOBS ?= 1
MUTANTS ?=
mutation: setup
	mkdir -p $(MUTATION_DIR)
	rm -rf $(MUTATION_DIR)/ccp $(MUTATION_DIR)/tests && cp -r ccp tests pyproject.toml $(MUTATION_DIR)/
	cd $(MUTATION_DIR) && $(abspath $(BIN))/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS); \
		status=$$?; cd $(CURDIR) && $(BIN)/python benchmarks/results/mutation/write_report.py $(MUTATION_DIR) \
		benchmarks/results/mutation/report.md && exit $$status

# Tables 1-2 over several seeds (ccp/reproduce/seeds.py): per seed, training and sampling seeds shifted, its trainings
# and tables in their own folders (seed 0 = reproduce-tables' run, reused); then results_dir holds each number as
# mean [95% Student t interval], Fig. 9 with error bars, table_spread.md (sampling vs run seeds), claims.md and
# environment.json. Toy: about 25 min per added seed on 2 cores (prior cached), plus the sampling-seed spread.
SEEDS ?= 0,1,2
reproduce-seeds: setup
	$(BIN)/ccp-reproduce scale=$(SCALE) "seeds=[$(SEEDS)]" $(ARGS)

# Image translation and stylization gallery (docs/translation.md) on the random-weight tiny prior (seconds, offline):
# the prior's own samples as init images, translated with the concept term at three strengths (guidance=translate),
# and stylize with a single-file checkpoint of another tiny prior as the style term. Grids go to docs/images/.
GALLERY_DIR ?= outputs/gallery
GALLERY_INIT = [$(GALLERY_DIR)/photo/images/00000.png,$(GALLERY_DIR)/photo/images/00001.png,$(GALLERY_DIR)/photo/images/00002.png,$(GALLERY_DIR)/photo/images/00003.png]
gallery: setup
	$(BIN)/ccp-tiny-prior $(GALLERY_DIR)/prior --seed 0
	$(BIN)/ccp-tiny-prior $(GALLERY_DIR)/style_prior --seed 1
	$(BIN)/python -m ccp.priors.single_file $(GALLERY_DIR)/style_prior $(GALLERY_DIR)/style.safetensors
	$(BIN)/ccp-null-text $(GALLERY_DIR)/prior $(GALLERY_DIR)/concept
	$(BIN)/ccp-sample prior.path=$(GALLERY_DIR)/prior guidance.terms.text.prompt="a red car" sampling.num_images=4 \
		hydra.run.dir=$(GALLERY_DIR)/photo
	for s in 0.3 0.6 1.0; do \
		$(BIN)/ccp-sample prior.path=$(GALLERY_DIR)/prior concept.path=$(GALLERY_DIR)/concept guidance=translate \
			"init.image=$(GALLERY_INIT)" init.strength=$$s sampling.num_images=4 hydra.run.dir=$(GALLERY_DIR)/translate_$$s || exit 1; \
	done
	$(BIN)/ccp-sample prior.path=$(GALLERY_DIR)/prior concept.path=$(GALLERY_DIR)/concept guidance=stylize \
		+denoiser_checkpoints.style=$(GALLERY_DIR)/style.safetensors guidance.terms.control.prompt="a red car" \
		sampling.num_images=4 hydra.run.dir=$(GALLERY_DIR)/stylize
	mkdir -p docs/images
	cp $(GALLERY_DIR)/photo/grid.png docs/images/translation_init.png
	for s in 0.3 0.6 1.0; do cp $(GALLERY_DIR)/translate_$$s/grid.png docs/images/translation_strength_$$s.png; done
	cp $(GALLERY_DIR)/stylize/grid.png docs/images/stylize_single_file.png

# The same on the toy prior (ccp/toy/gallery.py): plain digits drawn by the prior, translated into the bold concept at
# three strengths, and concept + a LoRA fine-tuned from the toy prior + prompt. Needs the toy reproduction's exports
# (make reproduce-tables SCALE=toy); writes docs/images/toy_translation.png.
toy-gallery: setup
	$(BIN)/python -m ccp.toy.gallery --out docs/images/toy_translation.png
