// Small helpers for measurement.

// Keep one thread busy for about `cycles` SM clock cycles. The benchmark
// queues it first so that the launches timed after it line up back to back
// on the GPU instead of waiting for Python to issue each one.
extern "C" __global__ void spin(unsigned long long cycles) {
    const long long t0 = clock64();
    while ((unsigned long long)(clock64() - t0) < cycles) {
    }
}
