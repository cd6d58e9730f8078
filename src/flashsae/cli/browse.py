"""flashsae browse: a static website of each latent's top-activating contexts."""
from __future__ import annotations

import argparse

HELP = "Write a static site of what each latent responds to: top contexts, histograms, promoted tokens."
EPILOG = """examples:
  flashsae browse runs/layer6 --acts acts/ --out site/            # then open site/index.html
  flashsae browse runs/layer6 --acts acts/ --out site/ --latents 500 --top 30 --rows 1000000
  flashsae browse runs/llama --acts acts/ --out site/ --no-promoted   # large model: tokenizer only
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by flashsae train")
    p.add_argument("--acts", required=True, metavar="ACTS_DIR", help="activation directory written by flashsae harvest")
    p.add_argument("--out", required=True, metavar="SITE_DIR", help="directory for index.html and the latent pages")
    p.add_argument("--latents", type=int, default=None, metavar="N",
                   help="write pages for latents 0..N-1 (default: all, at most 1000)")
    p.add_argument("--top", type=int, default=20, metavar="N", help="top-activating contexts per latent (default: 20)")
    p.add_argument("--window", type=int, default=10, metavar="N", help="tokens shown either side (default: 10)")
    p.add_argument("--rows", type=int, default=None, metavar="N", help="read only the first N rows (default: all)")
    p.add_argument("--no-promoted", dest="promoted", action="store_false",
                   help="skip the tokens each latent promotes: loads the tokenizer only, not the model")
    p.add_argument("--device", default="cpu", help="device for encoding (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument("--json", action="store_true", help="print the site's index path as JSON")


def run(args: argparse.Namespace) -> int:
    from flashsae.lm.browse import build_site

    out = build_site(args.run_dir, args.acts, args.out, latents=args.latents, top=args.top, window=args.window,
                     rows=args.rows, promoted=args.promoted, device=args.device,
                     progress=not (args.quiet or args.json))
    if args.json:
        from flashsae.cli.common import print_json

        print_json({"index": str(out / "index.html")})
    elif not args.quiet:
        print(f"wrote {out / 'index.html'}")
    return 0
