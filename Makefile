# Native kernels: memory-checked tests and the latency benchmark.
PYTHON ?= python
ASAN_LIB := build/asan/_bitkernels_asan.so
# every C file of the library, as setup.py builds it (the runtime, the drivers, one file per ISA)
CSRC := $(sort $(wildcard src/bibert/csrc/*.c src/bibert/csrc/isa/*.c))
CHDR := $(sort $(wildcard src/bibert/csrc/*.h src/bibert/csrc/isa/*.h))

.PHONY: asan tsan bench bench-quick

# Builds the kernels with AddressSanitizer and runs the native kernel and engine tests and
# the attacks on the packed format on it. The default kernel family is the portable one:
# GCC's AddressSanitizer does not check AVX-512 masked loads (tests that force a family
# still run it).
asan: $(ASAN_LIB)
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" \
	BIBERT_NATIVE_LIB=$(abspath $(ASAN_LIB)) BIBERT_KERNEL=portable \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_packed.py tests/test_packed_elastic.py tests/test_packed_bimax.py tests/test_packed_kbit.py tests/test_packed_softmax.py tests/test_packed_security.py

$(ASAN_LIB): $(CSRC) $(CHDR)
	mkdir -p $(dir $@)
	gcc -O1 -g -std=gnu11 -pthread -fno-strict-aliasing -ffp-contract=off -fPIC -shared \
	    -fsanitize=address -fno-omit-frame-pointer -o $@ $(CSRC)

# Builds the kernels with ThreadSanitizer and runs on it the thread-pool tests (every kernel,
# 1 to 7 threads, each kernel family) and the engine's multithreaded forward (the encoder's
# sequence groups run in parallel, or one group's kernels split across the threads, the last layer
# of a forward without hidden states on the first rows only; sign,
# elastic, "bi-max" and k-bit models, every encoder blocking; the k-bit forward's sequences in
# parallel, or each of its steps across the threads, with Bi-Attention and softmax attention). A data race in the pool, in a
# kernel's per-thread scratch or between groups stops the run with a report. The fork test is
# left out: ThreadSanitizer cannot start threads after a multi-threaded fork. PyTorch, which
# builds the tests' students, runs on one thread: its OpenMP pool synchronises in ways that
# ThreadSanitizer does not see (the engine's pool is its own, with as many threads as asked).
TSAN_LIB := build/tsan/_bitkernels_tsan.so
tsan: $(TSAN_LIB)
	TSAN_OPTIONS="halt_on_error=1 report_signal_unsafe=0" OMP_NUM_THREADS=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
	BIBERT_NATIVE_LIB=$(abspath $(TSAN_LIB)) \
	$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_packed.py tests/test_packed_elastic.py \
	    tests/test_packed_bimax.py tests/test_packed_kbit.py tests/test_packed_softmax.py \
	    -k "pool_gives or spin_budget_changes or paths_agree or threads_do_not or threads_identical or tuning_does_not or native_forward or first_rows"

$(TSAN_LIB): $(CSRC) $(CHDR)
	mkdir -p $(dir $@)
	gcc -O1 -g -std=gnu11 -pthread -fno-strict-aliasing -ffp-contract=off -fPIC -shared \
	    -fsanitize=thread -o $@ $(CSRC)

# Packed engine vs PyTorch (writes benchmarks/results/latency.json and .md).
bench:
	$(PYTHON) benchmarks/latency.py

bench-quick:
	$(PYTHON) benchmarks/latency.py --quick
