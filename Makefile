# One virtual environment in .venv holds the package and, for tests and benchmarks, its test extra.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= The capital of France is
# llama.cpp as a benchmark peer, built from source. The native build's AMX path crashes on some
# CPUs, so AMX is off and AVX-512 is on only where /proc/cpuinfo says the CPU has it.
AVX512 := $(if $(shell grep -m1 -o avx512f /proc/cpuinfo 2>/dev/null),ON,OFF)
LLAMA_CPP_VERSION ?= 0.3.36
OPEN_WEBUI_VERSION ?= 0.12.4
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$(AVX512) \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install deps image image-check install-test system-test-deps run test test-full lint bench bench-serve bench-offload aiperf-venv openwebui chaos crash soak proto fatbin gpu-carry gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_FLAGS) --upgrade pip

# setup.py builds the native CPU kernels (kernels/cpu/*.c) into kernels._cpu: a C compiler is needed.
$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(wildcard kernels/cpu/*.c kernels/cpu/*.h)
	$(BIN)/pip install -q $(PIP_FLAGS) -e .
	touch $@

# deps: the package's dependencies and those of its EXTRAS (e.g. EXTRAS=cuda), not the package: the image's layer of
# them outlives a code change. pycuda (the cuda extra) builds from its sdist against cuda.h and links libcuda.so.1,
# the driver's library: the headers come from the toolkit where there is one (/usr/local/cuda), else from PyPI's
# CUDA runtime and profiler-API wheels; a stub libcuda.so.1 with cuda.h's functions as empty ones satisfies the link
# and records the dependency (the driver's own is loaded at run time; an empty stub would be dropped by the linker);
# curand, which the kernels do not use, is left out (pycuda's configuration: $$HOME/.aksetup-defaults.py).
DEPS_PY := import sys; t = __import__("tomllib" if sys.version_info >= (3, 11) else "tomli"); \
	p = t.load(open("pyproject.toml", "rb"))["project"]; \
	print("\n".join(p["dependencies"] + [d for e in sys.argv[1:] for d in p["optional-dependencies"][e]]))
CUDA_HEADERS ?= 'nvidia-cuda-runtime==13.*' 'nvidia-cuda-profiler-api==13.*'
CUDA_BUILD := $(abspath $(VENV))/cuda-build
deps: $(BIN)/python
	$(BIN)/pip install -q $(PIP_FLAGS) 'tomli>=2; python_version < "3.11"'
	$(BIN)/python -c '$(DEPS_PY)' $(EXTRAS) > $(VENV)/deps.txt
ifneq ($(filter cuda,$(EXTRAS)),)
	mkdir -p $(CUDA_BUILD)/lib64
	test -f /usr/local/cuda/include/cuda.h && ln -sfn /usr/local/cuda/include $(CUDA_BUILD)/include || \
		($(BIN)/pip install -q $(PIP_FLAGS) --target $(CUDA_BUILD)/wheel $(CUDA_HEADERS) && \
		ln -sfn "$$(dirname "$$(find $(CUDA_BUILD)/wheel -name cuda.h -path '*/include/*' | head -1)")" $(CUDA_BUILD)/include)
	echo '#include <cuda.h>' | $(CC) -E -P -I$(CUDA_BUILD)/include -x c - | \
		grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( ' | sort -u | sed 's/.*/void &(void) {}/' | \
		$(CC) -shared -x c - -Wl,-soname,libcuda.so.1 -o $(CUDA_BUILD)/lib64/libcuda.so
	printf 'CUDA_ROOT = "%s"\nCUDA_ENABLE_CURAND = False\n' $(CUDA_BUILD) > $(CUDA_BUILD)/.aksetup-defaults.py
	HOME=$(CUDA_BUILD) $(BIN)/pip install -q $(PIP_FLAGS) -r $(VENV)/deps.txt
	rm -rf $(CUDA_BUILD)
else
	$(BIN)/pip install -q $(PIP_FLAGS) -r $(VENV)/deps.txt
endif

# Debian packages the tests need: a headless browser for the dashboard's test (and certutil, from
# libnss3-tools, to make it trust the appliance's CA), libb64 for Triton's
# perf_analyzer (inside tritonclient), an arm64 cross compiler and qemu-aarch64 for the arm64
# kernels' test (tests/test_cpu_arm64.py). Installed with apt-get only where one is missing.
system-test-deps:
	@(command -v chromium && command -v chromedriver && command -v certutil && ldconfig -p | grep -q libb64.so.0d && \
		command -v aarch64-linux-gnu-gcc && command -v qemu-aarch64 && test -e /usr/aarch64-linux-gnu/include/stdio.h) >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver libnss3-tools libb64-0d \
			gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-bench: | $(VENV)/.installed-test  # order-only: a kernel change does not rebuild the peer
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir --force-reinstall --no-deps 'llama-cpp-python==$(LLAMA_CPP_VERSION)'
	$(BIN)/pip install -q 'llama-cpp-python[server]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## run: set up, fetch the default model (once), and generate from it
run: install
	$(BIN)/appliance generate "$(PROMPT)"

## test: lint, then the whole test suite (fetches the default model once)
test: install-test system-test-deps lint
	$(BIN)/appliance-ctl models fetch --local
	$(BIN)/python -m pytest -q

## test-full: the same suite with its heavy tests at full size (every CUDA target, every trial and client count)
test-full: install-test system-test-deps lint
	$(BIN)/appliance-ctl models fetch --local
	APPLIANCE_TESTS=full $(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## bench: load time, memory, prefill and decode tokens/s beside llama.cpp and transformers, in one run
bench: $(VENV)/.installed-bench $(VENV)/llama-rpc/llama-bench
	$(BIN)/appliance bench

## bench-serve: tokens/s, TTFT and inter-token latency at 1/4/8/16 streaming clients, beside llama.cpp's server;
##   a two-turn chat's TTFT with and without the prefix cache, constrained vs free decoding tokens/s;
##   then Triton's perf_analyzer over HTTP and gRPC streaming, and NVIDIA's aiperf where .venv-aiperf exists
bench-serve: $(VENV)/.installed-bench $(VENV)/llama-rpc/llama-bench
	$(BIN)/appliance bench-serve
	$(BIN)/python -m appliance.bench.perf_analyzer
	@if [ -x .venv-aiperf/bin/aiperf ]; then $(BIN)/python -m appliance.bench.aiperf; \
	else echo "aiperf: not installed (make aiperf-venv: its own virtualenv, ~1.2 GB)"; fi

## openwebui: Open WebUI in its own virtualenv (.venv-openwebui: ~7.4 GB, ~5 min to install) pointed at the
##   appliance as its Ollama server: its API lists the model and chats, and so does its page in headless Chromium
openwebui: $(VENV)/.installed-test system-test-deps
	test -x .venv-openwebui/bin/open-webui || (python3 -m venv .venv-openwebui && \
		.venv-openwebui/bin/pip install -q open-webui==$(OPEN_WEBUI_VERSION))
	$(BIN)/appliance-ctl models fetch --local
	$(BIN)/python -m tests.openwebui_check --open-webui .venv-openwebui/bin/open-webui

## aiperf-venv: NVIDIA's aiperf in .venv-aiperf (it pins older rich and psutil than ours), for bench-serve
aiperf-venv:
	python3 -m venv .venv-aiperf
	.venv-aiperf/bin/pip install -q aiperf==0.13.0

## bench-offload: all-local vs split over 1 and 2 workers, loopback and delayed links, beside llama.cpp's RPC
bench-offload: $(VENV)/.installed-test $(VENV)/llama-rpc/llama-bench
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/appliance bench-offload --llama-bin $(VENV)/llama-rpc

## chaos: 20 trials of a worker killed or frozen mid-generation under tight budgets; each text must be all-local's
chaos: install-test
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 $(BIN)/python -m appliance.drills.chaos --trials 20

## crash: 21 trials of the server killed -9 mid key creation, pairing and model fetch, then restarted (state kept)
crash: install-test
	APPLIANCE_TESTS=full $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_crash.py -k server

## soak: 16 clients for 5 minutes mixing good, bad, cancelled and oversized requests over /v1, /v2 and gRPC
soak: $(VENV)/.installed-test
	$(BIN)/appliance-ctl models fetch --local
	$(BIN)/python -m appliance.drills.soak --seconds $(or $(SOAK_SECONDS),300) --clients 16

# llama.cpp's RPC server, llama-bench, llama-server and llama-quantize, built from the sources inside the
# llama-cpp-python sdist (never vendored); the sources stay unpacked: tests/hf_models.py runs its convert_hf_to_gguf.py
LLAMA_SRC := $(VENV)/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
LLAMA_TOOLS := ggml-rpc-server llama-bench llama-server llama-quantize
$(VENV)/llama-rpc/llama-bench: | $(VENV)/.installed-test
	mkdir -p $(VENV)/llama-src $(VENV)/llama-rpc
	test -f $(LLAMA_SRC)/CMakeLists.txt || ($(BIN)/pip download -q --no-deps --no-binary :all: \
		'llama-cpp-python==$(LLAMA_CPP_VERSION)' -d $(VENV)/llama-src && \
		tar xzf $(VENV)/llama-src/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(VENV)/llama-src)
	cmake -S $(LLAMA_SRC) -B $(VENV)/llama-src/build -DGGML_RPC=ON \
		$(LLAMA_CMAKE_ARGS) -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(VENV)/llama-src/build --target $(LLAMA_TOOLS) -j$$(nproc)
	cp $(addprefix $(VENV)/llama-src/build/bin/,$(LLAMA_TOOLS)) $(VENV)/llama-rpc/

## image: both Dockerfile targets built with buildah (no daemon) on a debootstrapped Debian base made here, and the
##   worker for arm64 too with ARM64=auto (qemu-user, binfmt_misc; slow); sizes and build times printed
image: $(VENV)/.installed
	@(command -v buildah && command -v debootstrap) >/dev/null || (apt-get update -q && apt-get install -y -q buildah debootstrap)
	@if [ "$(or $(ARM64),no)" != no ]; then test -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P || \
		(apt-get update -q && apt-get install -y -q qemu-user-static binfmt-support); fi
	$(BIN)/python -m appliance.testbed.image --arm64 $(or $(ARM64),no)

## image-check: the built images run as containers: serve, health, a completion from OpenAI's client, a worker
##   paired and holding layers, a restart keeping keys and devices, non-root (minutes; not part of `make test`);
##   WORKER_ARCH=arm64 takes the arm64 worker image (built by ARM64=auto), run through qemu-user
image-check: image $(VENV)/.installed-test
	$(BIN)/python -m appliance.testbed.image_check

## proto: regenerate the offload service's stubs from offload/offload.proto (a test fails when they are stale)
proto: install-test
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. offload/offload.proto

## fatbin: rebuild the CUDA kernels' fatbin and manifest with nvcc from PyPI (no GPU needed; a test fails when stale)
fatbin: $(VENV)/.installed-test
	$(BIN)/python -m kernels.cuda.build

# The lent GPU machines have python3.12, torch, nvcc and compute-sanitizer but no network and no pycuda:
# gpu-carry gathers here what gpu-check installs there (pycuda's sdist, built there; small pure-Python
# wheels; the image has their other needs). The default model (98 MB) is over one call's 64 MiB, so it travels
# split in two folders: carry .gpu-carry in one call and .gpu-carry-2 in the next on the same warm machine.
GPU_CARRY := .gpu-carry
GPU_WHEELS := --only-binary :all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
	--platform manylinux_2_17_x86_64
GPU_PY ?= python3

## gpu-carry: pycuda's sdist, its small dependencies, gguf and the split model file into .gpu-carry*/ (git-ignored)
gpu-carry: $(VENV)/.installed-test
	rm -rf $(GPU_CARRY) $(GPU_CARRY)-2 && mkdir -p $(GPU_CARRY) $(GPU_CARRY)-2
	$(BIN)/pip download -q --no-deps --no-binary :all: --no-build-isolation pycuda -d $(GPU_CARRY)
	$(BIN)/pip download -q --no-deps $(GPU_WHEELS) pytools platformdirs siphash24 mako gguf pytest pluggy iniconfig -d $(GPU_CARRY)
	$(BIN)/appliance-ctl models fetch --local
	split -b 50M $$($(BIN)/python -c "from models.store import ModelStore; print(ModelStore().get())") $(GPU_CARRY)/model.part-
	mv $(GPU_CARRY)/model.part-ab $(GPU_CARRY)-2/
	du -sh $(GPU_CARRY) $(GPU_CARRY)-2

## gpu-check: on a GPU machine, every GPU check in one table (kernels, the emulator's kernel tests mirrored on the GPU,
##   --backend cuda's greedy text, compute-sanitizer, benchmark)
gpu-check:
	test -d $(GPU_CARRY)/site || CUDA_ROOT=$$(dirname $$(dirname $$(readlink -f $$(which nvcc)))) \
		$(GPU_PY) -m pip install -q --no-index --no-build-isolation --find-links $(GPU_CARRY) \
		--no-deps --target $(GPU_CARRY)/site pycuda pytools platformdirs siphash24 mako gguf pytest pluggy iniconfig
	cat $(GPU_CARRY)/model.part-* $(GPU_CARRY)-2/model.part-* > $(GPU_CARRY)/model.gguf
	PYTHONPATH=$$PWD:$$PWD/$(GPU_CARRY)/site PYTHONUNBUFFERED=1 $(GPU_PY) -m appliance.bench.gpu_check \
		--model $(GPU_CARRY)/model.gguf

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
