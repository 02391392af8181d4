"""Policy-gradient estimators side by side on real tasks, same budget, several seeds; and rollout throughput.

Experiments (SmolLM2-135M-Instruct, LoRA, bf16; every run a `tunelab train` subprocess with its own seed):

  steering   recipes/rl_rt_steering.yaml: continue the first 5 words of a Rotten Tomatoes snippet, reward
             P(fresh) of the whole text under a tunelab sentiment classifier (trained first with
             recipes/rt_sentiment.yaml when --classifier does not exist yet).
  headline   recipes/rl_bbc_headlines.yaml: ROUGE-L against the real BBC title, starting from ONE supervised
             warm start (the recipe's train section, LoRA merged) shared by every estimator and seed, so that
             "before" is the SFT model for all of them.

Each estimator gets the same number of rollouts, prompts per rollout and samples per prompt (ppo additionally
reuses each rollout for rl.ppo_epochs updates: the same samples, more compute). Held-out numbers are the
recipe's dev prompts, before and after, one seeded sample per prompt (reward, KL, perplexity under the
reference, distinct-2) and greedy outputs (greedy reward).

    .venv/bin/python bench/rl.py --experiments steering headline --seeds 1 2 3 --out bench/results/rl.json
    .venv/bin/python bench/rl.py --rollout-speed --out bench/results/rl_rollout.json

Runs go --parallel at a time with --threads torch threads each (default 2 x 1 on 2 cores). Results are
appended to --out as each run finishes; an interrupted bench skips what is already there.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RECIPES = {"steering": ROOT / "recipes" / "rl_rt_steering.yaml", "headline": ROOT / "recipes" / "rl_bbc_headlines.yaml"}
ESTIMATORS = ("reinforce", "rloo", "self_critical", "ppo")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def tunelab(args_list: list[str], log: Path) -> dict:
    """`python -m tunelab ...` as a subprocess; wall and CPU seconds of that process alone (wait4)."""
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args_list], cwd=ROOT, env=ENV, stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"tunelab {' '.join(args_list[:2])} exited with {code}; see {log}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "cpu_per_wall": round(cpu / wall, 2),
            "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def prepare(args, work: Path) -> dict:
    """Shared starting points: the sentiment classifier (steering) and the SFT model (headline)."""
    extra = {}
    if "steering" in args.experiments:
        cls = Path(args.classifier)
        if not (cls / "tunelab.json").is_file():
            print(f"training the reward classifier into {cls}", file=sys.stderr, flush=True)
            tunelab(["train", str(ROOT / "recipes" / "rt_sentiment.yaml"), f"output_dir={cls}",
                     f"train.threads={args.threads * args.parallel}"], work / "rt_sentiment.log")
        extra["steering"] = [f"rl.classifier={cls.resolve()}"]
    if "headline" in args.experiments:
        sft = work / "headline_sft"
        if not (sft / "report.json").is_file():
            print(f"supervised warm start into {sft}", file=sys.stderr, flush=True)
            # The RL recipe's own train/tune/data settings, as a plain generation run with the adapter merged.
            t = tunelab(["train", str(RECIPES["headline"]), "task=generate", "rl.sft=false",
                         f"output_dir={sft}", "tune.merge=true", f"train.threads={args.threads}",
                         *args.sft_overrides, "--overwrite"], work / "headline_sft.log")
            (work / "headline_sft.json").write_text(json.dumps(t))
        extra["headline"] = [f"model.name={(sft / 'merged').resolve()}", "rl.sft=false"]
    return extra


def one_run(args, work: Path, experiment: str, estimator: str, seed: int, extra: list[str]) -> dict:
    out = work / f"{experiment}_{estimator}_{seed}"
    over = [f"output_dir={out}", f"rl.estimator={estimator}", f"train.seed={seed}", f"train.threads={args.threads}",
            f"rl.steps={args.steps}" if args.steps else None, *extra, *args.overrides]
    over = [o for o in over if o]
    timing = tunelab(["train", str(RECIPES[experiment]), *over, "--overwrite"], work / f"{out.name}.log")
    rep = json.loads((out / "report.json").read_text())
    keep = ("reward", "greedy_reward", "kl", "ref_perplexity", "distinct_1", "distinct_2", "greedy_distinct_2",
            "length")
    return {"experiment": experiment, "estimator": estimator, "seed": seed, **timing,
            "steps": rep["steps"], "train_seconds": rep["train_seconds"], "rollout_seconds": rep["rollout_seconds"],
            "before": {k: rep["before"][k] for k in keep}, "after": {k: rep["after"][k] for k in keep},
            "samples": rep["samples"][:3]}


def rollout_speed(args) -> dict:
    """Sampled tokens/s: tunelab's rollout (k samples per prompt in one generate call, KV cache) against a
    plain loop that calls generate once per sample, same model, prompts and sampling settings."""
    import torch

    from tunelab.data.packaged import load_builtin
    from tunelab.models import load_model, load_tokenizer, resolve_model_path
    from tunelab.predict import autocast
    from tunelab.rl.rollout import completion_mask, sample
    from tunelab.tasks import make_task

    torch.set_num_threads(args.threads * args.parallel)
    path = resolve_model_path("SmolLM2-135M-Instruct")
    tok = load_tokenizer(path)
    model = load_model(path, "generate", []).eval()
    task = make_task("generate", tok, [], 64, prompt_suffix="", max_target_length=20)
    prompts = [e.prompt for e in load_builtin("rt_prompts").dev[:8]]
    k, new, bf16, device = 4, 20, True, torch.device("cpu")
    results = []
    for rep in range(args.repeats):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        roll = sample(model, task, prompts, k, new, bf16=bf16)
        batched = time.perf_counter() - t0, roll.n_tokens
        t0, tokens = time.perf_counter(), 0
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([tok(p)["input_ids"]])
                for _ in range(k):
                    with autocast(device, bf16):
                        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                             top_k=0, max_new_tokens=new, pad_token_id=task.pad,
                                             eos_token_id=task.eos)
                    tokens += int(completion_mask(gen[:, ids.shape[1]:], task.eos).sum())
        loop = time.perf_counter() - t0, tokens
        results.append({"batched_s": round(batched[0], 2), "batched_tokens": batched[1],
                        "batched_tokens_per_s": round(batched[1] / batched[0], 1),
                        "loop_s": round(loop[0], 2), "loop_tokens": loop[1],
                        "loop_tokens_per_s": round(loop[1] / loop[0], 1)})
        print(results[-1], file=sys.stderr, flush=True)
    speedups = [r["batched_tokens_per_s"] / r["loop_tokens_per_s"] for r in results]
    return {"rollout_speed": results, "speedup_median": round(statistics.median(speedups), 2),
            "setting": f"{len(prompts)} prompts x {k} samples, {new} new tokens, bf16, "
                       f"{args.threads * args.parallel} threads", "load_end": os.getloadavg()[0]}


def summarise(results: list[dict]) -> str:
    rows = ["| experiment | estimator | seeds | held-out reward before -> after | greedy reward before -> after | "
            "KL after | ref. perplexity before -> after | distinct-2 before -> after | wall s | CPU/wall |",
            "|---|---|---:|---|---|---:|---|---|---:|---:|"]
    keyed = {}
    for r in results:
        if "estimator" in r:
            keyed.setdefault((r["experiment"], r["estimator"]), []).append(r)

    def ms(vals, fmt="{:.3f}"):
        m = statistics.mean(vals)
        return fmt.format(m) + (f" ± {fmt.format(statistics.stdev(vals))}" if len(vals) > 1 else "")

    for (exp, estimator), rs in sorted(keyed.items()):
        b, a = [r["before"] for r in rs], [r["after"] for r in rs]
        rows.append(f"| {exp} | {estimator} | {len(rs)} | {ms([x['reward'] for x in b])} -> "
                    f"{ms([x['reward'] for x in a])} | {ms([x['greedy_reward'] for x in b])} -> "
                    f"{ms([x['greedy_reward'] for x in a])} | {ms([x['kl'] for x in a], '{:.2f}')} | "
                    f"{ms([x['ref_perplexity'] for x in b], '{:.1f}')} -> {ms([x['ref_perplexity'] for x in a], '{:.1f}')} | "
                    f"{ms([x['distinct_2'] for x in b])} -> {ms([x['distinct_2'] for x in a])} | "
                    f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {statistics.mean(r['cpu_per_wall'] for r in rs):.2f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    p.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="rl.steps for every run (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--classifier", default=str(ROOT / "runs" / "rt_sentiment"))
    p.add_argument("--work", default=str(ROOT / "runs" / "bench_rl"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rl.json"))
    p.add_argument("--rollout-speed", action="store_true", help="only the rollout throughput comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sft-overrides", nargs="*", default=[], help="key=value for the headline warm start")
    p.add_argument("overrides", nargs="*", help="key=value for every RL run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.rollout_speed:
        res = rollout_speed(args)
        out.write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "rollout_speed"}, indent=2))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text())["runs"] if out.is_file() else []
    done = {(r["experiment"], r["estimator"], r["seed"]) for r in results}
    extra = prepare(args, work)
    todo = [(e, est, s) for e in args.experiments for s in args.seeds for est in args.estimators
            if (e, est, s) not in done]

    def save():
        out.write_text(json.dumps({"runs": results, "command": " ".join(sys.argv)}, indent=2))

    def job(item):
        e, est, s = item
        print(f"=== {e} {est} seed {s}", file=sys.stderr, flush=True)
        r = one_run(args, work, e, est, s, extra[e])
        print(f"    {e} {est} seed {s}: reward {r['before']['reward']:.3f} -> {r['after']['reward']:.3f}, "
              f"KL {r['after']['kl']:.2f}, {r['wall_s']:.0f} s (CPU/wall {r['cpu_per_wall']})",
              file=sys.stderr, flush=True)
        return r

    with ThreadPoolExecutor(args.parallel) as pool:
        for fut in as_completed([pool.submit(job, item) for item in todo]):
            results.append(fut.result())
            save()
    print(summarise(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
