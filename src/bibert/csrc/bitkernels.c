/* Bitwise XOR/popcount kernels of the packed BiBERT engine (filled in by the engine). */
#include <stdint.h>
int bibert_abi_version(void) { return 1; }
