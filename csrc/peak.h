#pragma once

namespace ncfast {

// Best FLOP/s (a fused multiply-add counts 2) of float32 or float64 vector FMAs on num_threads
// threads over repeated runs for about `seconds`: the compute floor's denominator.
double fma_peak(bool float64, double seconds, int num_threads);

}  // namespace ncfast
