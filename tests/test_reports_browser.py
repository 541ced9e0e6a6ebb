"""Every report, rendered in a real headless browser (Debian's chromium driven by Playwright): no console errors,
no request leaving the page (reports are self-contained), no card whose text overflows it, no broken image.

CONCEPTLENS_SCREENSHOTS=DIR keeps the screenshots there (docs/reports/ holds the last committed run).
"""
import os
import shutil
from pathlib import Path

import pytest

from conceptlens.cli import main
from conftest import two_class_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by make setup")
if not os.path.exists(CHROMIUM):
    pytest.skip("needs Debian's chromium (make setup installs it as root)", allow_module_level=True)

VL = "builtin:lite-clip"
CHECK = """() => {
  const cards = [...document.querySelectorAll('.card')];
  const right = c => c.getBoundingClientRect().right;
  const over = cards.filter(c => c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1
                                 || [...c.children].some(e => right(e) > right(c) + 1));
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  return {cards: cards.length, overflowing: over.map(c => c.innerText.slice(0, 60)),
          broken: broken.map(i => i.alt || i.src.slice(0, 40)), images: document.images.length,
          width: document.documentElement.scrollWidth};
}"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One report per verb that produces results, on small synthetic sets (the embedded models)."""
    t = tmp_path_factory.mktemp("reports")
    mp = pytest.MonkeyPatch()
    mp.setenv("CONCEPTLENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))  # as the per-test fixture does
    data = two_class_folder(t / "data", ("cat", "ship"), (32, 32))
    long = two_class_folder(t / "long", ("a_class_name_much_longer_than_any_card_is_wide", "ship"), (40, 40))
    for f in (long / "ship").iterdir():
        f.rename(f.with_name("an_image_file_name_that_would_overflow_its_card_" + f.name))
    bank = t / "bank.txt"
    bank.write_text("a red cat on a table\na blue ship at sea\na bright red wall\nthe deep blue sea\na small boat\n")
    concepts = t / "concepts.txt"
    concepts.write_text("red\nblue\nsea\ncat\nship\nwall\nsky\nfur\n")
    r = t / "r"
    runs = {
        "zeroshot": ["zeroshot", "--model", VL, "--data", str(long)],
        "linear-probe": ["linear-probe", "--model", VL, "--train", str(data), "--test", str(data)],
        "cbm": ["cbm", "--model", VL, "--train", str(data), "--test", str(data), "--concepts", str(concepts)],
        "diagnose": ["diagnose", "--model", VL, "--data-a", str(data), "--data-b", str(long), "--concepts",
                     str(concepts), "--top", "5"],
        "search": ["search", "red & !blue", "--model", VL, "--data", str(long), "--top-k", "20"],
        "decode": ["decode", "--model", VL, "--data", str(data), "--captions", str(bank), "--generate"],
        "decompose": ["decompose", "--model", VL, "--data", str(long), "--concepts", str(concepts), "--n-concepts", "3"],
        "explain": ["explain", "--model", "builtin:mobilenetv2", "--data", str(long), "--features", "3,5",
                    "--top-n", "4", "--vl-model", VL, "--captions", str(bank)],
        "diffusion-classify": ["diffusion-classify", "--data", str(data), "--strategy", "halving", "--budget", "8"],
    }
    for name, argv in runs.items():
        assert main(argv + ["--report", str(r / name)]) == 0, name
    pages = {name: r / name / "index.html" for name in runs}
    # training writes its report into its run folder
    pairs = t / "pairs.csv"
    pairs.write_text("path,caption\n" + "".join(f"{f},a photo of a {f.parent.name}\n" for f in sorted(data.rglob("*.png"))))
    (t / "cfg.toml").write_text(f'data = "{pairs}"\nembed_dim = 16\nepochs = 20\nbatch_size = 4\nlr = 0.01\nwarmup = 5\n')
    assert main(["train", "clip", "--config", str(t / "cfg.toml"), "--out", str(r / "train-run")]) == 0
    pages["train"] = r / "train-run" / "report" / "index.html"
    mp.undo()
    return pages


def test_every_report_renders_cleanly_in_chromium(reports, tmp_path):
    from playwright.sync_api import sync_playwright
    shots = Path(os.environ.get("CONCEPTLENS_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    problems = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        for name, page_path in reports.items():
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors, outside = [], []
            page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.on("request", lambda q, outside=outside: outside.append(q.url)
                    if not q.url.startswith(("data:", "file:")) else None)
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            got = page.evaluate(CHECK)
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            bad = {k: v for k, v in (("console", errors), ("requests", outside), ("overflowing", got["overflowing"]),
                                     ("broken images", got["broken"])) if v}
            if got["images"] == 0:
                bad["images"] = "none"
            if got["width"] > 1280:
                bad["page wider than the window"] = got["width"]
            if bad:
                problems[name] = bad
            page.close()
        browser.close()
    assert not problems, problems
    assert all((shots / f"{n}.png").stat().st_size > 10_000 for n in reports)


def test_reports_carry_provenance_and_labels(reports):
    import json
    for name, page in reports.items():
        html = page.read_text()
        assert "provenance" in html and "conceptlens " in html, name
        js = next(f for f in page.parent.glob("*.json"))
        prov = json.loads(js.read_text())["provenance"]
        assert {"command", "conceptlens", "git", "date", "datasets", "args"} <= set(prov), name
        assert prov["datasets"] and all({"spec", "n_images", "identity"} <= set(d) for d in prov["datasets"]), name
    assert "#1 · score" in reports["search"].read_text() and "--partial 0.5" in reports["search"].read_text()
    assert "Wilson" in reports["zeroshot"].read_text() and "A: data" in reports["diagnose"].read_text()
    assert "Grad-CAM heat maps" in reports["explain"].read_text()
