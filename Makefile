# Native kernels: memory-checked tests and the latency benchmark.
PYTHON ?= python
ASAN_LIB := build/asan/_bitkernels_asan.so
CSRC := src/bibert/csrc/bitkernels.c

.PHONY: asan bench bench-quick

# Builds the kernels with AddressSanitizer and runs the native kernel and engine tests on it.
asan: $(ASAN_LIB)
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	BIBERT_NATIVE_LIB=$(abspath $(ASAN_LIB)) \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_packed.py

$(ASAN_LIB): $(CSRC)
	mkdir -p $(dir $@)
	gcc -O1 -g -std=gnu11 -pthread -fno-strict-aliasing -ffp-contract=off -fPIC -shared \
	    -fsanitize=address -fno-omit-frame-pointer -o $@ $(CSRC)

# Packed engine vs PyTorch (writes benchmarks/results/latency.json and .md).
bench:
	$(PYTHON) benchmarks/latency.py

bench-quick:
	$(PYTHON) benchmarks/latency.py --quick
