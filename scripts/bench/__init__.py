"""flashcli's benchmarks: the paper's table on this machine, and flashcli against llama.cpp.

    python -m scripts.bench [--section NAME ...] [--quick]     (make bench)

One module per section, each writing its results as JSON under bench-out/; report.py (with
report_limits.py and report_decoding.py, their cells in cells.py) turns every result present
into BENCHMARKS.md and the charts in docs/bench/. Sections:
  disk      the disk's cost model: direct reads by size and thread count
  dense     dense decode, flashcli against llama.cpp (warm cache, same threads)
  limits    flash generation against llama.cpp under the same memory limit, cold cache
  ablation  the paper's ablation table (naive ... all) on the ReLU fixture and the 1.5B
  quality   perplexity dense against flash, file sizes and the predictor study
  speculative  several tokens per pass: --draft off|ngram|auto at 50%, against llama.cpp's speculative
  batch     many prompts at once: --batch --parallel 1|8|16|most at 50% (and --batched-products), against
            llama.cpp's batched decoding (warm, no limit) at the same sequence counts
Runs that time speed are cold (page cache dropped), inside a cgroup when limited
(cgroup.py), and wait for quiet CPUs first (runner.py).
"""
