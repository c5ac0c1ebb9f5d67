#include "tutti/core/threads.hpp"

#include <omp.h>

#include <thread>

#include "tutti/core/error.hpp"

namespace tutti {

void set_num_threads(int n) {
  TUTTI_CHECK_AS(InvalidArgument, n >= 1, "thread count must be at least 1, got ", n);
  omp_set_num_threads(n);
}
int num_threads() { return omp_get_max_threads(); }
int hardware_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

}  // namespace tutti
