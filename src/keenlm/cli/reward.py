"""``keenlm train-reward POLICY``: an outcome (ORM) or process (PRM) reward model trained on a
policy's own rollouts (keenlm.infer.reward)."""
from __future__ import annotations

import keenlm
from keenlm.cli.options import add_task_options, task_of
from keenlm.infer.reward import train_reward


def add_parser(sub, fmt):
    tr = sub.add_parser("train-reward", help="train an outcome or process reward model on a "
                        "policy's own rollouts", formatter_class=fmt)
    tr.add_argument("policy", help="the policy: run folder, .gguf file or HF folder")
    tr.add_argument("--kind", required=True, choices=("orm", "prm"),
                    help="orm: one label per answer; prm: Monte-Carlo labels per step")
    tr.add_argument("--out", required=True, help="output folder (a reward model)")
    add_task_options(tr)
    tr.add_argument("--problems", type=int, default=200, help="training problems")
    tr.add_argument("--samples", type=int, default=4, help="rollouts per problem")
    tr.add_argument("--rollouts", type=int, default=4, help="prm: Monte-Carlo continuations per step")
    tr.add_argument("--steps", type=int, default=300, help="training steps (16 examples each)")
    tr.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    return tr


def run(args) -> int:
    tokenizer = keenlm.load(args.policy).tokenizer if args.template == "chat" else None
    info = train_reward(args.policy, args.kind, task_of(args, tokenizer), args.out, problems=args.problems,
                        samples=args.samples, rollouts=args.rollouts, steps=args.steps, lr=args.lr,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"wrote {args.out}: {info['kind']} on {info['examples']} rollouts ({info['labels']} labels, "
          f"{100 * info['positive_share']:.1f}% positive); labelling {info['label_seconds']:.0f} s, "
          f"training {info['train_seconds']:.0f} s")
    return 0
