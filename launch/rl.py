"""``python -m launch train-rl``: train the Intelligent Router's Double DQN in the simulator, then
evaluate it on a later window of the trace against every published policy.

Theory of operation
-------------------
An *episode* is one simulation (:func:`launch.sim.cluster.simulate`) of a random ``--episode-window``
seconds of the trace's first ``--train-until`` seconds, at ``--rate-scale``, on ``--instances`` x
``--profile``. The acting policy is :class:`router.model.intelligent.IntelligentRouter` with
epsilon-greedy exploration over ``Q - guidance x mixing penalty``; every decision is a transition
``(state, action)``. When the episode ends, each routed request's reward is ``-e2e / E2E_SCALE`` plus a
completion bonus of 1 (0 if it was rejected), a hold's reward ``-HOLD_S / E2E_SCALE``; the next state is
the next decision's (the last is terminal). Transitions go to a replay buffer; after each episode
``--updates`` minibatches of 512 train the online network (scikit-learn ``MLPRegressor``, 64-64 ReLU,
Adam, one ``partial_fit`` per minibatch) towards Double-DQN targets ``r + gamma * Q_target(s',
argmax_a Q_online(s', a))``, the target network copied every ``--target-every`` episodes. The guidance
weight decays by ``--guidance-decay`` per episode (HuRL: the heuristic steers early exploration and
fades). The whole run is seeded (``--seed``: episode windows, exploration, the network's init).

Output (``--out DIR``): ``checkpoint-EEEE.npz`` every ``--checkpoint-every`` episodes and
``final.npz`` (weights, guidance, predictor), ``curve.json`` and ``curve.png`` (episode mean E2E and
return), ``eval.json`` (the evaluation table). The length predictor (most frequent output bucket per
log2 prompt-length bin, from the training part) is reported with its accuracy on the evaluation window;
``intelligent_router_oracle`` uses the true bucket with probability ``--oracle-accuracy`` (the paper's
~79 %) and a uniformly drawn other bucket otherwise.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from agents.engine.profiles import PROFILES
from launch.sim.cluster import HOLD_S, SimConfig, simulate
from launch.sim.prompts import PromptFactory
from launch.sim.run import result_summary, seeded_policy
from launch.trace import DEFAULT_TRACE, TraceRequest, load_trace, window
from router.model.intelligent import (
    N_BUCKETS,
    IntelligentRouter,
    LengthPredictor,
    QNet,
    output_bucket,
)
from router.model.policies import PUBLISHED, InstanceView

__all__ = ["add_arguments", "run_train_rl"]

E2E_SCALE: Final = 10.0
"""Seconds of end-to-end latency per unit of reward."""
BATCH: Final = 512


def train_predictor(reqs: Sequence[TraceRequest], bins: int = 18) -> LengthPredictor:
    """The most frequent output bucket per log2 prompt-length bin (the overall mode for empty bins)."""
    counts = np.zeros((bins, N_BUCKETS), dtype=np.int64)
    for r in reqs:
        b = min(max(int(np.log2(max(r.input_length, 1))), 0), bins - 1)
        counts[b, output_bucket(r.output_length)] += 1
    mode = int(counts.sum(axis=0).argmax())
    return LengthPredictor(tuple(int(c.argmax()) if c.sum() else mode for c in counts))


def predictor_accuracy(p: LengthPredictor, reqs: Sequence[TraceRequest]) -> float:
    ok = sum(1 for r in reqs if p.predict(r.input_length) == output_bucket(r.output_length))
    return ok / max(len(reqs), 1)


class _Acting(IntelligentRouter):
    """Epsilon-greedy acting with guidance; remembers ``(state, action)`` per decision."""

    def __init__(self, net: QNet | None, predictor: LengthPredictor, rng: random.Random) -> None:
        super().__init__(net, predictor)
        self.rng = rng
        self.epsilon = 0.0
        self.n_actions = 0  # 0: every action; n: only the first n (no hold)
        self.trace: list[tuple[npt.NDArray[np.float64], int]] = []

    def choose(self, views: Sequence[InstanceView], prompt_tokens: int, cached: Any) -> Any:
        from router.model.policy_base import by_name

        ordered = by_name(views)
        scores = self.action_scores(ordered, prompt_tokens, cached)
        k = self.n_actions or len(scores)
        explore = self.rng.random() < self.epsilon
        a = self.rng.randrange(k) if explore else int(np.argmax(scores[:k]))
        assert self.last_state is not None
        self.trace.append((self.last_state, a))
        return self.decide_action(ordered, prompt_tokens, cached, a, scores)


def _qnet(reg: Any, n: int) -> QNet:
    return QNet(tuple(np.array(w) for w in reg.coefs_), tuple(np.array(b) for b in reg.intercepts_), n)


def _episode(
    reqs: Sequence[TraceRequest], rate: float, pol: IntelligentRouter, cfg: SimConfig, prompts: PromptFactory,
    order: list[int],
) -> Any:  # fmt: skip
    plan = window(list(reqs), rate, None)

    def before(req: TraceRequest, held: int) -> None:
        pol.held = held
        order.append(req.index)

    return simulate(plan, pol, cfg, prompts=prompts, before_route=before)


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--trace", type=Path, default=DEFAULT_TRACE)
    a("--profile", default="h20-qwen2.5-7b", choices=sorted(PROFILES))
    a("--instances", type=int, default=16)
    a("--rate-scale", type=float, default=1.0, help="training load (default %(default)s)")
    a("--train-until", type=float, default=1200.0, help="episodes come from trace seconds [0, this)")
    a("--episode-window", type=float, default=120.0, help="trace seconds per episode (default %(default)s)")
    a("--episodes", type=int, default=200)
    a("--minutes", type=float, default=12.0, help="stop training after this wall time (default %(default)s)")
    a("--updates", type=int, default=8, help="minibatches of 512 per episode (default %(default)s)")
    a("--gamma", type=float, default=0.9)
    a("--lr", type=float, default=1e-3)
    a("--guidance", type=float, default=1.0, help="initial guidance weight (default %(default)s)")
    a("--guidance-decay", type=float, default=0.97, help="per episode (default %(default)s)")
    a("--epsilon", type=float, default=0.2, help="initial exploration, decays linearly to 0.02")
    a("--target-every", type=int, default=4)
    a("--checkpoint-every", type=int, default=20)
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=Path("rl-out"))
    a("--eval-from", type=float, default=1200.0, help="evaluation window start, trace seconds")
    a("--eval-window", type=float, default=600.0, help="evaluation window length, trace seconds")
    a("--eval-rates", default="", help="LEVEL=X,... rate scales to evaluate at (default: the training one)")
    a("--oracle-accuracy", type=float, default=0.79)
    a("--no-eval", action="store_true")
    a("--no-hold", action="store_true", help="never hold at the router (train and evaluate without it)")


def run_train_rl(args: argparse.Namespace) -> int:
    import warnings

    from sklearn.neural_network import MLPRegressor  # the rl extra; only the trainer needs it

    warnings.filterwarnings("ignore", message=".*batch_size.*", category=UserWarning)  # first minibatches

    rng = random.Random(args.seed)
    cfg = SimConfig(instances=args.instances, profile=args.profile, seed=args.seed)
    all_reqs = load_trace(args.trace)
    train = [r for r in all_reqs if r.arrival < args.train_until]
    predictor = train_predictor(train)
    evalw = [r for r in all_reqs if args.eval_from <= r.arrival < args.eval_from + args.eval_window]
    acc = predictor_accuracy(predictor, evalw)
    print(f"length predictor (prompt length -> output bucket): accuracy {acc:.3f} on the evaluation window "
          f"({len(evalw)} requests); on the training part {predictor_accuracy(predictor, train):.3f}")  # fmt: skip
    prompts = PromptFactory(cfg.page_size, cfg.vocab_size)
    n = args.instances
    n_feat = 2 + N_BUCKETS + 5 * n
    reg = MLPRegressor(hidden_layer_sizes=(64, 64), learning_rate_init=args.lr, batch_size=BATCH,
                       random_state=args.seed)  # fmt: skip
    reg.partial_fit(np.zeros((1, n_feat)), np.zeros((1, n + 1)))
    target = _qnet(reg, n)
    replay: list[tuple[npt.NDArray[np.float64], int, float, npt.NDArray[np.float64] | None]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    guidance = args.guidance
    bar = tqdm(total=args.episodes, unit="ep", desc="train-rl", dynamic_ncols=True)
    ep = 0
    for ep in range(args.episodes):
        if time.perf_counter() - t0 > 60 * args.minutes:
            break
        start = rng.uniform(0.0, max(args.train_until - args.episode_window, 0.0))
        reqs = [replace(r, arrival=r.arrival - start) for r in train
                if start <= r.arrival < start + args.episode_window]  # fmt: skip
        if len(reqs) < 2:
            continue
        pol = _Acting(_qnet(reg, n) if ep > 0 else None, predictor, rng)
        pol.guidance = guidance
        pol.n_actions = n if args.no_hold else 0
        pol.epsilon = max(0.02, args.epsilon * (1 - ep / max(args.episodes - 1, 1)))
        order: list[int] = []
        res = _episode(reqs, args.rate_scale, pol, cfg, prompts, order)
        rec = {r.index: r for r in res.records}
        ret = 0.0
        steps = pol.trace
        for k, ((s, a), idx) in enumerate(zip(steps, order, strict=True)):
            if a == n:
                r = -HOLD_S / E2E_SCALE
            else:
                rr = rec[idx]
                r = (-rr.e2e / E2E_SCALE + 1.0) if rr.status == "ok" and rr.e2e is not None else -1.0
            ret += r
            nxt = steps[k + 1][0] if k + 1 < len(steps) else None
            replay.append((s, a, r, nxt))
        replay = replay[-200_000:]
        online = _qnet(reg, n)
        for _ in range(args.updates):
            batch = [replay[rng.randrange(len(replay))] for _ in range(min(BATCH, len(replay)))]
            x = np.stack([b[0] for b in batch])
            y = online.q(x)
            nx = [b[3] for b in batch]
            live = [i for i, v in enumerate(nx) if v is not None]
            tgt = np.array([b[2] for b in batch])
            if live:
                xn = np.stack([nx[i] for i in live])  # type: ignore[misc]
                a_star = online.q(xn).argmax(axis=1)
                tgt[live] += args.gamma * target.q(xn)[np.arange(len(live)), a_star]
            y[np.arange(len(batch)), [b[1] for b in batch]] = tgt
            reg.partial_fit(x, y)
            online = _qnet(reg, n)
        if ep % args.target_every == 0:
            target = _qnet(reg, n)
        summ = result_summary(res)
        curve.append({"episode": ep, "e2e_mean": summ["e2e"]["mean"], "ttft_mean": summ["ttft"]["mean"],
                      "return": ret, "guidance": guidance, "epsilon": pol.epsilon,
                      "holds": sum(1 for _, a in steps if a == n), "wall_s": time.perf_counter() - t0})  # fmt: skip
        bar.set_postfix(e2e=f"{summ['e2e']['mean']:.2f}", ret=f"{ret:.0f}", g=f"{guidance:.2f}")
        bar.update(1)
        if (ep + 1) % args.checkpoint_every == 0:
            _save(args.out / f"checkpoint-{ep + 1:04d}.npz", _qnet(reg, n), guidance, predictor)
        guidance *= args.guidance_decay
    bar.close()
    train_s = time.perf_counter() - t0
    final = _qnet(reg, n)
    _save(args.out / "final.npz", final, guidance, predictor)
    (args.out / "curve.json").write_text(json.dumps({"train_wall_s": train_s, "episodes": curve}, indent=1))
    _plot_curve(curve, args.out / "curve.png")
    print(f"trained {len(curve)} episodes in {train_s:.0f} s; final guidance {guidance:.3f}")
    if args.no_eval:
        return 0
    rates = _parse_rates(args.eval_rates) or {"train": args.rate_scale}
    report: dict[str, Any] = {"trace": str(args.trace), "profile": args.profile, "instances": n,
                              "eval_window": [args.eval_from, args.eval_from + args.eval_window],
                              "train_until": args.train_until, "train_wall_s": train_s,
                              "episodes": len(curve), "predictor_accuracy": acc, "levels": {}}  # fmt: skip
    ev = [replace(r, arrival=r.arrival - args.eval_from) for r in evalw]
    for lv, rate in rates.items():
        rows: dict[str, Any] = {}
        for name in ["intelligent_router", "intelligent_router_oracle", "mixing_penalty", *PUBLISHED]:
            if name.startswith("intelligent_router"):
                ir = IntelligentRouter(final, predictor)
                ir.guidance = guidance
                ir.allow_hold = not args.no_hold
                hook = _oracle_hook(ir, ev, args.oracle_accuracy, args.seed) if name.endswith("oracle") else \
                    _held_hook(ir)  # fmt: skip
                res = simulate(window(ev, rate, None), ir, cfg, prompts=prompts, before_route=hook)
            else:
                res = simulate(window(ev, rate, None), seeded_policy(name, cfg), cfg, prompts=prompts)
            sm = result_summary(res)
            rows[name] = {k: sm[k]["mean"] for k in ("ttft", "tpot", "e2e")} | {"p99_e2e": sm["e2e"]["p99"]}
            print(f"{lv} rate {rate:g} {name:<26} TTFT {sm['ttft']['mean']:.3f}  TPOT "
                  f"{1e3 * sm['tpot']['mean']:.1f} ms  E2E {sm['e2e']['mean']:.3f}", flush=True)  # fmt: skip
        rr = rows["round_robin"]["e2e"]
        for r in rows.values():
            r["e2e_vs_round_robin_pct"] = 100 * (r["e2e"] - rr) / rr
        report["levels"][lv] = {"rate_scale": rate, "rows": rows}
    (args.out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _held_hook(pol: IntelligentRouter) -> Any:
    def hook(req: TraceRequest, held: int) -> None:
        pol.held = held

    return hook


def _oracle_hook(pol: IntelligentRouter, reqs: Sequence[TraceRequest], accuracy: float, seed: int) -> Any:
    rng = random.Random(seed)
    noisy = {}
    for r in reqs:
        b = output_bucket(r.output_length)
        if rng.random() >= accuracy:
            b = rng.choice([k for k in range(N_BUCKETS) if k != b])
        noisy[r.index] = b

    def hook(req: TraceRequest, held: int) -> None:
        pol.held = held
        pol.next_bucket = noisy[req.index]

    return hook


def _parse_rates(spec: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        k, _, v = item.partition("=")
        out[k] = float(v)
    return out


def _save(path: Path, net: QNet, guidance: float, predictor: LengthPredictor) -> None:
    arrays: dict[str, Any] = {f"w{k}": w for k, w in enumerate(net.weights)}
    arrays |= {f"b{k}": b for k, b in enumerate(net.biases)}
    arrays |= {"n_instances": net.n_instances, "guidance": guidance, "predictor": np.array(predictor.table)}
    np.savez(path, **arrays)


def load_checkpoint(path: Path) -> tuple[QNet, float, LengthPredictor]:
    """A :func:`_save` file back: the network, its guidance weight and the length predictor."""
    d = np.load(path)
    layers = sum(1 for k in d.files if k.startswith("w"))
    net = QNet(tuple(d[f"w{k}"] for k in range(layers)), tuple(d[f"b{k}"] for k in range(layers)),
               int(d["n_instances"]))  # fmt: skip
    return net, float(d["guidance"]), LengthPredictor(tuple(int(x) for x in d["predictor"]))


def _plot_curve(curve: Sequence[dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    eps = [c["episode"] for c in curve]
    for axis, key, label in (
        (ax[0], "e2e_mean", "episode mean E2E (s)"),
        (ax[1], "return", "episode return"),
    ):
        v = np.array([c[key] for c in curve], dtype=float)
        axis.plot(eps, v, alpha=0.4, label="episode")
        if len(v) >= 10:
            axis.plot(eps[9:], np.convolve(v, np.ones(10) / 10, mode="valid"), label="mean of 10")
        axis.set_xlabel("episode")
        axis.set_ylabel(label)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m launch.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    sys.exit(run_train_rl(p.parse_args()))
