"""`fewstep bench MODEL`: latency, throughput, peak memory and network evaluations of full text-to-image generation
(prompt encoding + denoising loop + VAE decode) through the sampling engine, optionally against the stock Diffusers
pipeline call on the same model, batch, steps, guidance, resolution and seeds.

Protocol, per (steps, batch) case and per side (engine, stock):

* a probe run with a forward pre-hook on the denoising network counts its calls and batch rows (NFE per image =
  rows / batch, so batched CFG counts 2 per step). Without compilation the probe is the first warm-up run; with
  `--compile`/`--cuda-graphs` every probe runs eagerly before the network is compiled (compilation does not change
  how often the network is called), and all warm-up runs are compiled ones;
* the remaining warm-up runs, then `repeats` timed runs. Engine and stock runs alternate, so drift on a shared
  machine hits both sides alike. CUDA is synchronised before and after each timed call;
* memory: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (baseline: memory allocated
  just before the call); on CPU the process RSS, sampled by a background thread every 2 ms during each timed call
  (baseline: RSS just before the call, after the warm-ups, so memory the allocator kept from them is not counted
  again). Peak = max over the timed runs; increase = peak - smallest baseline. `env.memory_after_load_mb` records
  the same measure right after the model was loaded, before any run.

Both sides do the same work: the same prompts and per-image seeds (image i of a batch uses seed + i, identical in
every repeat), the same guidance and resolution, decoding to a [0, 1] tensor that stays on the device (the stock
call uses `output_type="pt"`); the stock pipeline's progress bar, safety checker and watermarker are switched off,
and bf16 autocast (CUDA) wraps the denoising network alone on both sides. A teacher runs the engine's DDIM/Euler
grid against the pipeline's own scheduler; an export runs its recorded sampler against the recorded stock scheduler
with `timesteps=` (or `sigmas=`). Stock NFE is counted too; a ratio computed over unequal work is flagged.
"""
from fewstep.bench.measure import ForwardCounter, Measurement, Memory, Stats, batch_tensor, counting
from fewstep.bench.report import BenchRow, markdown_table, write_results
from fewstep.bench.run import BenchOptions, parse_int_list, run_bench, run_bench_cli

__all__ = ["BenchOptions", "BenchRow", "ForwardCounter", "Measurement", "Memory", "Stats", "batch_tensor", "counting",
           "markdown_table", "parse_int_list", "run_bench", "run_bench_cli", "write_results"]
