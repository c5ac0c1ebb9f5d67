// Intra-op parallelism: one OpenMP thread pool shared by tutti's kernels and oneDNN's GEMM.
#pragma once

namespace tutti {

// Sets the number of threads kernels use (n >= 1). Default: the cores of the machine.
void set_num_threads(int n);
int num_threads();
int hardware_threads();

}  // namespace tutti
