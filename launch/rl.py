"""``python -m launch train-rl``: train the Intelligent Router's Double DQN in the simulator, then
evaluate it on a later window of the trace against the published policies.

Theory of operation
-------------------
An *episode* is one simulation (:func:`launch.sim.cluster.simulate`) of a random ``--episode-window``
seconds of the trace's first ``--train-until`` seconds, at ``--rate-scale``, on ``--instances`` x
``--profile``. The acting policy is :class:`router.model.intelligent.IntelligentRouter` with a *shared*
Q-network (one small MLP scores each action from that action's row of
:func:`~router.model.intelligent.candidate_matrix`: the request's and cluster's features plus that
instance's, or a hold flag) and epsilon-greedy exploration over ``Q - guidance x mixing penalty``.
Every decision (a first routing or a re-ask after a hold) is a transition; its virtual time is
reconstructed from the ingest model (:func:`launch.sim.ingest.ingest_times`) plus ``HOLD_S`` per
earlier hold of the same request. When the episode ends, the returns come from
:mod:`launch.rl_targets`: by default (``--reward little``) the time every request spends in the system
between decisions, discounted by ``--gamma`` per second over ``--horizon`` seconds and bootstrapped
from the target network (Double DQN: the online network picks the action, the target network values
it). ``--cost-scale`` 0 scales the returns by the first episode's (guided) cost so Q is near -1.

Transitions go to a replay buffer of the last ``--replay-episodes`` episodes; after each episode
``--updates`` minibatches of 512 train the online network (scikit-learn ``MLPRegressor``, 64-64 ReLU,
Adam, one ``partial_fit`` per minibatch); the target network is copied every ``--target-every``
episodes. The guidance weight decays by ``--guidance-decay`` per episode (HuRL: the heuristic steers
early exploration and fades); epsilon decays linearly from ``--epsilon`` to 0.01 over ``--episodes``.
The whole run is seeded (``--seed``: episode windows, exploration, sampling, the network's init).

Output (``--out DIR``): ``checkpoint-EEEE.npz`` every ``--checkpoint-every`` episodes and
``final.npz`` (weights, guidance, predictor), ``curve.json`` and ``curve.png`` (episode mean E2E and
return), ``eval.json`` (the evaluation table, :mod:`launch.rl_eval`). The length predictor (most
frequent output bucket per log2 prompt-length bin, from the training part) is reported with its
accuracy on the evaluation window; ``intelligent_router_oracle`` uses the true bucket with probability
``--oracle-accuracy`` (the paper's ~79 %) and a uniformly drawn other bucket otherwise.
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
from launch.rl_eval import evaluate, held_hook, plot_curve
from launch.rl_targets import Episode, Replay, Returns, little_returns, own_returns
from launch.sim.cluster import HOLD_S, SimConfig, SimResult, simulate
from launch.sim.ingest import ingest_times
from launch.sim.prompts import PromptFactory
from launch.sim.run import result_summary, seeded_policy
from launch.trace import DEFAULT_TRACE, TraceRequest, load_trace, window
from router.model.intelligent import (
    N_BUCKETS,
    N_FEATURES,
    IntelligentRouter,
    LengthPredictor,
    QNet,
    output_bucket,
)
from router.model.policies import InstanceView, Policy
from router.model.policy_base import by_name

__all__ = ["add_arguments", "load_checkpoint", "predictor_accuracy", "run_train_rl", "train_predictor"]

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
    """Epsilon-greedy acting with guidance; remembers ``(candidate matrix, action)`` per decision."""

    def __init__(self, net: QNet, predictor: LengthPredictor, rng: random.Random) -> None:
        super().__init__(net, predictor)
        self.rng = rng
        self.epsilon = 0.0
        self.n_actions = 0  # 0: every action; n: only the first n (no hold)
        self.trace: list[tuple[npt.NDArray[np.float64], int]] = []

    def choose(self, views: Sequence[InstanceView], prompt_tokens: int, cached: Any) -> Any:
        ordered = by_name(views)
        scores = self.action_scores(ordered, prompt_tokens, cached)
        k = self.n_actions or len(scores)
        explore = self.rng.random() < self.epsilon
        a = self.rng.randrange(k) if explore else int(np.argmax(scores[:k]))
        assert self.last_state is not None
        self.trace.append((self.last_state, a))
        return self.decide_action(ordered, prompt_tokens, cached, a, scores)


def _qnet(reg: Any, n: int) -> QNet:
    return QNet(tuple(np.array(w) for w in reg.coefs_), tuple(np.array(b) for b in reg.intercepts_), n, True)


def _episode(
    reqs: Sequence[TraceRequest], rate: float, pol: _Acting, cfg: SimConfig, prompts: PromptFactory
) -> tuple[SimResult, list[int], npt.NDArray[np.float64]]:
    """Simulate; returns the result, the request of each decision and each decision's virtual time."""
    plan = window(list(reqs), rate, None)
    routed = ingest_times([t for t, _ in plan], [r.input_length for _, r in plan], cfg.ingest_overhead,
                          cfg.ingest_per_token)  # fmt: skip
    first = {r.index: t for (_, r), t in zip(plan, routed, strict=True)}
    order: list[int] = []
    times: list[float] = []
    seen: dict[int, int] = {}

    def before(req: TraceRequest, held: int) -> None:
        pol.held = held
        order.append(req.index)
        times.append(first[req.index] + HOLD_S * seen.get(req.index, 0))
        seen[req.index] = seen.get(req.index, 0) + 1

    return simulate(plan, pol, cfg, prompts=prompts, before_route=before), order, np.asarray(times)


def _returns(args: argparse.Namespace, res: SimResult, order: list[int], times: Any, routed: list[bool],
             scale: float) -> Returns:  # fmt: skip
    ends = {r.index: (r.start_time + r.e2e if r.status == "ok" and r.e2e is not None else None)
            for r in res.records}  # fmt: skip
    if args.reward == "own":
        return own_returns(times, order, ends, routed, HOLD_S, scale)
    starts = np.array([r.start_time for r in res.records])
    fin = np.array(
        [e if e is not None else r.start_time for r, e in zip(res.records, ends.values(), strict=True)]
    )
    return little_returns(times, starts, fin, args.gamma, args.horizon, scale)


def _auto_scale(args: argparse.Namespace, res: SimResult, times: Any) -> float:
    """Scale the returns so the first (guided) episode's are near -1: its mean E2E (``own``), or its mean
    number of requests in the system times the discounted horizon (``little``)."""
    ok = [r for r in res.records if r.e2e is not None]
    mean_e2e = sum(r.e2e for r in ok if r.e2e is not None) / max(len(ok), 1)
    if args.reward == "own":
        return max(mean_e2e, 1e-3)
    span = max(float(times[-1] - times[0]), 1e-3)
    in_system = len(ok) * mean_e2e / span  # Little's law over the episode
    g, h = float(args.gamma), float(args.horizon)
    return max(in_system * ((1 - g**h) / -float(np.log(g)) if g < 1 else h), 1e-3)


def _validate(
    reqs: Sequence[TraceRequest], rate: float, pol: Policy, cfg: SimConfig, prompts: PromptFactory
) -> float:
    """Mean E2E of ``pol`` on the validation window (greedy; the simulator's held count reported)."""
    hook = held_hook(pol) if isinstance(pol, IntelligentRouter) else None
    res = simulate(window(list(reqs), rate, None), pol, cfg, prompts=prompts, before_route=hook)
    return float(result_summary(res)["e2e"]["mean"])


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
    a("--updates", type=int, default=16, help="minibatches of 512 per episode (default %(default)s)")
    a("--reward", choices=("little", "own"), default="little", help="see launch/rl_targets.py")
    a("--gamma", type=float, default=0.8, help="discount per virtual second (default %(default)s)")
    a(
        "--horizon",
        type=float,
        default=2.0,
        help="lookahead seconds before bootstrapping (default %(default)s)",
    )
    a("--cost-scale", type=float, default=0.0, help="return scale; 0: from the first episode")
    a("--lr", type=float, default=1e-3)
    a("--guidance", type=float, default=1.0, help="initial guidance weight (default %(default)s)")
    a("--guidance-decay", type=float, default=0.97, help="per episode (default %(default)s)")
    a("--epsilon", type=float, default=0.1, help="initial exploration, decays linearly to 0.01")
    a("--target-every", type=int, default=2)
    a("--replay-episodes", type=int, default=30)
    a("--checkpoint-every", type=int, default=20)
    a("--val-from", type=float, default=600.0, help="validation window start (trace seconds, training part)")
    a("--val-every", type=int, default=10, help="episodes between validations (0: none)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=Path("rl-out"))
    a("--eval-from", type=float, default=1200.0, help="evaluation window start, trace seconds")
    a("--eval-window", type=float, default=600.0, help="evaluation window length, trace seconds")
    a("--eval-rates", default="", help="LEVEL=X,... rate scales to evaluate at (default: the training one)")
    a("--eval-policies", default="", help="comma-separated (default: every one; round_robin always)")
    a("--oracle-accuracy", type=float, default=0.79)
    a(
        "--pick",
        choices=("best", "final"),
        default="best",
        help="evaluate the best validated weights or the last ones (default %(default)s)",
    )
    a("--no-eval", action="store_true")
    a("--no-hold", action="store_true", help="never hold at the router (train and evaluate without it)")


def _update(reg: Any, replay: Replay, target: QNet, n: int, args: argparse.Namespace, nrng: Any) -> None:
    """One Double-DQN minibatch: targets ``g + disc x Q_target(s', argmax_a Q_online(s', a))``."""
    online = _qnet(reg, n)
    x, g, disc, nxt = replay.sample(nrng, BATCH)
    live = np.flatnonzero(disc > 0)
    y = g.copy()
    if len(live):
        k = n if args.no_hold else n + 1  # actions the policy may take
        xs = np.stack([nxt[i] for i in live]).astype(np.float64)  # (L, n + 1, F)
        flat = xs.reshape(-1, xs.shape[-1])
        qo = online.q(flat)[:, 0].reshape(len(live), -1)[:, :k]
        qt = target.q(flat)[:, 0].reshape(len(live), -1)
        y[live] += disc[live] * qt[np.arange(len(live)), qo.argmax(axis=1)]
    reg.partial_fit(x, y)


def run_train_rl(args: argparse.Namespace) -> int:
    import warnings

    from sklearn.neural_network import MLPRegressor  # the rl extra; only the trainer needs it

    warnings.filterwarnings("ignore", message=".*batch_size.*", category=UserWarning)  # first minibatches

    rng = random.Random(args.seed)
    nrng = np.random.default_rng(args.seed)
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
    reg = MLPRegressor(hidden_layer_sizes=(64, 64), learning_rate_init=args.lr, batch_size=BATCH,
                       random_state=args.seed)  # fmt: skip
    reg.partial_fit(np.zeros((2, N_FEATURES)), np.zeros(2))
    target = _qnet(reg, n)
    replay = Replay(args.replay_episodes)
    args.out.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, float]] = []
    t0 = time.perf_counter()
    guidance, scale = args.guidance, args.cost_scale
    val = [replace(r, arrival=r.arrival - args.val_from) for r in train
           if args.val_from <= r.arrival < args.val_from + args.episode_window]  # fmt: skip
    val_base: dict[str, float] = {}
    if args.val_every > 0 and len(val) >= 2:
        for name in ("round_robin", "mixing_penalty"):
            val_base[name] = _validate(val, args.rate_scale, seeded_policy(name, cfg), cfg, prompts)
        print(f"validation window {args.val_from:g}+{args.episode_window:g} s: " +
              ", ".join(f"{k} {v:.3f} s" for k, v in val_base.items()))  # fmt: skip
    best = (np.inf, -1)
    bar = tqdm(total=args.episodes, unit="ep", desc="train-rl", dynamic_ncols=True)
    for ep in range(args.episodes):
        if time.perf_counter() - t0 > 60 * args.minutes:
            break
        start = rng.uniform(0.0, max(args.train_until - args.episode_window, 0.0))
        reqs = [replace(r, arrival=r.arrival - start) for r in train
                if start <= r.arrival < start + args.episode_window]  # fmt: skip
        if len(reqs) < 2:
            continue
        pol = _Acting(_qnet(reg, n), predictor, rng)
        pol.guidance = guidance if ep > 0 else 1e6  # the first episode: the mixing penalty alone
        pol.n_actions = n if args.no_hold else 0
        pol.epsilon = max(0.01, args.epsilon * (1 - ep / max(args.episodes - 1, 1)))
        res, order, times = _episode(reqs, args.rate_scale, pol, cfg, prompts)
        if scale <= 0:
            scale = _auto_scale(args, res, times)
        actions = np.array([a for _, a in pol.trace], dtype=np.int64)
        ret = _returns(args, res, order, times, [a != n for a in actions], scale)
        cands = np.stack([s for s, _ in pol.trace]).astype(np.float32)
        replay.add(Episode(cands, actions, ret))
        for _ in range(args.updates):
            _update(reg, replay, target, n, args, nrng)
        if ep % args.target_every == 0:
            target = _qnet(reg, n)
        summ = result_summary(res)
        curve.append({"episode": ep, "e2e_mean": summ["e2e"]["mean"], "ttft_mean": summ["ttft"]["mean"],
                      "mean_return": float(ret.g[ret.use].mean()), "guidance": min(pol.guidance, 1e3),
                      "epsilon": pol.epsilon, "holds": int((actions == n).sum()),
                      "wall_s": time.perf_counter() - t0})  # fmt: skip
        if val_base and (ep + 1) % args.val_every == 0:
            ir = IntelligentRouter(_qnet(reg, n), predictor)
            ir.guidance, ir.allow_hold = guidance, not args.no_hold
            curve[-1]["val_e2e"] = _validate(val, args.rate_scale, ir, cfg, prompts)
            if curve[-1]["val_e2e"] < best[0]:
                best = (curve[-1]["val_e2e"], ep + 1)
                _save(args.out / "best.npz", ir.net, guidance, predictor)  # type: ignore[arg-type]
        bar.set_postfix(e2e=f"{summ['e2e']['mean']:.2f}", holds=curve[-1]["holds"], g=f"{guidance:.2f}")
        bar.update(1)
        if (ep + 1) % args.checkpoint_every == 0:
            _save(args.out / f"checkpoint-{ep + 1:04d}.npz", _qnet(reg, n), guidance, predictor)
        if ep > 0:
            guidance *= args.guidance_decay
    bar.close()
    train_s = time.perf_counter() - t0
    final = _qnet(reg, n)
    _save(args.out / "final.npz", final, guidance, predictor)
    (args.out / "curve.json").write_text(json.dumps({"train_wall_s": train_s, "cost_scale": scale,
                                                     "validation": val_base, "best": best[1],
                                                     "episodes": curve}, indent=1))  # fmt: skip
    plot_curve(curve, val_base, args.out / "curve.png")
    if best[1] > 0 and args.pick == "best":
        final, guidance, _ = load_checkpoint(args.out / "best.npz")
    print(
        f"trained {len(curve)} episodes in {train_s:.0f} s (scale {scale:.3g}); evaluating the {args.pick} "
        f"weights (episode {best[1] if args.pick == 'best' and best[1] > 0 else len(curve)}, guidance {guidance:.3f})"
    )
    if args.no_eval:
        return 0
    rates = _parse_rates(args.eval_rates) or {"train": args.rate_scale}
    report: dict[str, Any] = {"trace": str(args.trace), "profile": args.profile, "instances": n,
                              "eval_window": [args.eval_from, args.eval_from + args.eval_window],
                              "train_until": args.train_until, "train_wall_s": train_s,
                              "episodes": len(curve), "predictor_accuracy": acc, "evaluated": args.pick,
                              "best_episode": best[1],
                              "args": {k: str(v) for k, v in sorted(vars(args).items()) if k != "func"}}  # fmt: skip
    policies = [p.strip() for p in args.eval_policies.split(",") if p.strip()]
    report["levels"] = evaluate(evalw, args.eval_from, rates, policies, final, guidance, predictor, cfg, prompts,
                                not args.no_hold, args.oracle_accuracy, args.seed)  # fmt: skip
    (args.out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _parse_rates(spec: str) -> dict[str, float]:
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        k, _, v = item.partition("=")
        out[k] = float(v)
    return out


def _save(path: Path, net: QNet, guidance: float, predictor: LengthPredictor) -> None:
    arrays: dict[str, Any] = {f"w{k}": w for k, w in enumerate(net.weights)}
    arrays |= {f"b{k}": b for k, b in enumerate(net.biases)}
    arrays |= {"n_instances": net.n_instances, "guidance": guidance, "predictor": np.array(predictor.table),
               "shared": net.shared}  # fmt: skip
    np.savez(path, **arrays)


def load_checkpoint(path: Path) -> tuple[QNet, float, LengthPredictor]:
    """A :func:`_save` file back: the network, its guidance weight and the length predictor."""
    d = np.load(path)
    layers = sum(1 for k in d.files if k.startswith("w"))
    shared = bool(d["shared"]) if "shared" in d.files else False  # older checkpoints: the paper's layout
    net = QNet(tuple(d[f"w{k}"] for k in range(layers)), tuple(d[f"b{k}"] for k in range(layers)),
               int(d["n_instances"]), shared)  # fmt: skip
    return net, float(d["guidance"]), LengthPredictor(tuple(int(x) for x in d["predictor"]))


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m launch.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    sys.exit(run_train_rl(p.parse_args()))
