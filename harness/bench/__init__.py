"""`harness bench`: the harness's DPO step against the seed notebook's naive path.

Both paths train their own copy of the same model on the same batches of the seed data (batch 8
pairs, the notebook's order), interleaved step by step in one process so that machine drift hits
both. The naive path is the notebook's: four forward passes (policy and reference, chosen and
rejected, each padded to the batch's common width), a full log-softmax over the vocabulary, then
gather. The harness path is `harness.step.dpo_batch`: one concatenated forward per model, the LM
head only on counted positions, chunked logsumexp; the reference live or from the cache.

Reported per case and path: tokens/s (all non-padding tokens of chosen and rejected, prompt
included), seconds per step (median after warm-up), peak RSS (memory.py: a child process per
path runs the same steps alone, since a process's peak cannot be split between interleaved paths),
and MFU: model FLOPs per second (8 N per token with a live reference: policy forward + backward 6 N,
reference forward 2 N; 6 N with a cached one) over the fp32 matmul rate measured at the start.
Before any timing is reported the paths must agree (harness/bench/agree.py: log-probs, the first
gradient norm, the losses over three steps or more), or the benchmark fails: it must not be fast
because it computes something else.

`--baseline trl` adds TRL's DPOTrainer on the same batches as a third path (trl_path.py, held to
the same agreement); `--gen` times sampling instead (gen.py). bf16 cases run only on a CPU with
native bf16 (harness.device.capability), unless `--force-bf16`.
"""


from harness.bench.cli import main, run_bench

__all__ = ["main", "run_bench"]
