// A small, fast, reproducible random generator whose whole state is one 64-bit word, so it is
// saved in checkpoints and restored exactly (splitmix64).
#pragma once
#include <cmath>
#include <cstdint>

namespace tutti {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) : state_(seed) {}
  // A generator for a sub-stream (e.g. the batch of one step) independent of the others.
  static Rng stream(uint64_t seed, uint64_t a, uint64_t b = 0) {
    Rng r(seed ^ (0x9E3779B97F4A7C15ull * (a + 1)) ^ (0xC2B2AE3D27D4EB4Full * (b + 1)));
    r.next();
    return r;
  }
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
  // Standard normal (Box-Muller).
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  uint64_t state() const { return state_; }
  void set_state(uint64_t s) { state_ = s; }

 private:
  uint64_t state_;
};

}  // namespace tutti
