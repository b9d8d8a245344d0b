# kvq: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
export NCCL_NVLS_ENABLE := 0
NVCC := $(firstword $(wildcard /usr/local/cuda/bin/nvcc) $(shell command -v nvcc 2>/dev/null))
ifneq ($(NVCC),)
  CMAKE_ARGS += -DCMAKE_CUDA_COMPILER=$(NVCC)
endif

.PHONY: setup configure build test demo bundle clean

setup:
	bash scripts/setup.sh

configure: setup
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)

build: configure
	cmake --build $(BUILD) -j $(JOBS)

test: build
	KVQ_CACHE=$(CURDIR)/.cache ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) --timeout 1500

demo: build
	bash scripts/demo.sh $(BUILD)

bundle:
	bash scripts/make_bundle.sh $(BUILD)-cuda bundle

clean:
	rm -rf $(BUILD)
