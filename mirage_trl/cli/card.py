"""`mirage-trl card FOLDER --eval-json results.json`: put an evaluation into a model folder's card.

Any model folder: a Mirage training output or checkpoint, an export, a text-only baseline, a GRPO run. The
card gets the accuracy table per latent mode and level and the model-index metadata the Hub shows
(`EvalResult`s); an Evaluation section already there is replaced. Results of another model or latent
size are refused. Nothing else in the folder changes.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "card",
        help="put a `mirage-trl eval` results.json into a model folder's card (table + model-index)",
        description=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("folder", help="the model folder whose README.md (model card) gets the results")
    p.add_argument(
        "--eval-json", required=True, help="results.json written by `mirage-trl eval --model FOLDER`"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..card import add_eval_results

    print(f"wrote {add_eval_results(args.folder, args.eval_json)}")
    return 0
