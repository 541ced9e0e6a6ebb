"""`diffusion-classify`: zero-shot classification with a text-conditioned diffusion model."""
from __future__ import annotations

from ._options import (add_data, add_device, add_outputs, add_precision, add_seed, dataset_of, fraction_range,
                       load_on_device, positive, table, write_json, write_report)


def register(sub) -> None:
    import argparse
    what = "zero-shot classification with a text-conditioned diffusion model"
    p = sub.add_parser("diffusion-classify", help=what, description=what,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="builtin:tiny-diffusion-cifar10", help="builtin:tiny-diffusion-cifar10 or diffusers:DIR")
    add_data(p)
    p.add_argument("--strategy", default="halving", choices=["fixed", "adaptive", "ttest", "halving"],
                   help="how denoiser evaluations are spent over the classes (README, Diffusion classifiers)")
    p.add_argument("--budget", type=positive, help="denoiser evaluations per image (halving)")
    p.add_argument("--n-samples", type=positive, default=30, help="samples per class (fixed)")
    p.add_argument("--t-range", type=fraction_range, default=(0.0, 1.0), metavar="LOW,HIGH",
                   help="fixed / ttest / halving: draw timesteps from this fraction of [0, T) (e.g. 0.5,1)")
    p.add_argument("--preset", default="cifar10", help="adaptive schedule preset: cifar10 (keep 5,1; 50,500; L1)")
    p.add_argument("--loss", choices=["l1", "l2"], help="error between the denoiser's output and the target "
                   "(default: the strategy's own: l1 for adaptive/halving, l2 otherwise)")
    p.add_argument("--target", default="eps", choices=["eps", "x0"], help="compare predicted noise or predicted image")
    p.add_argument("--templates", help="file of prompt templates ({} marks the class); default: unseen ones")
    add_precision(p)
    add_device(p)
    add_seed(p)
    add_outputs(p)
    p.set_defaults(func=classify)


def classify(a) -> None:
    from ..diffusion import DiffusionClassifier, evaluate
    from ..eval import load_templates
    tmpl = [t.replace("{c}", "{}") for t in load_templates(a.templates)] if a.templates else None
    ds = dataset_of(a, a.data)
    clf = DiffusionClassifier.from_preset(load_on_device(a, a.model), a.strategy, a.preset, a.loss, target=a.target,
                                          n_samples=a.n_samples, budget=a.budget, t_range=a.t_range, precision=a.precision,
                                          seed=a.seed)
    res = evaluate(clf, ds, tmpl, device=a.device)
    scores = res.pop("_scores")
    m = res["metrics"]
    table([["dataset", "model", "strategy", "images", "acc1", "evals/image", "s/image"],
           [res["dataset"], clf.model.name, a.strategy, res["n_images"], f"{m['acc1']:.4f}",
            f"{m['evals_per_image']:.0f}", f"{m['seconds_per_image']:.2f}"]])
    write_json(a.output, res)
    write_report(a, "diffusion_report", res, ds, scores.numpy())
