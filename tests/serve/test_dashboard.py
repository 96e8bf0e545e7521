"""The dashboard in a real headless browser (Debian's chromium driven by Playwright): while a
session generates, the glass-brain heatmaps and the charts render and keep changing."""
import os
import shutil

import pytest

from serve.api import create_app
from serve.engine import SamplingParams
from serving import ThreadServer, make_engine

CHROMIUM = os.environ.get("GLASSBRAIN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

BRAIN_PIXELS = """() => Array.from(document.querySelectorAll('#brain canvas')).map(c => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let lit = 0, hash = 0;
    for (let i = 0; i < d.length; i += 4) { lit += d[i] > 40; hash = (hash * 31 + d[i]) >>> 0; }
    return [c.width, lit, hash];
})"""


def test_dashboard_renders_and_updates_while_a_session_generates(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium browser at {CHROMIUM} (apt-get install chromium)")
    eng = make_engine(tmp_path)
    sid = eng.create_session().id
    with ThreadServer(create_app(eng, api_key="k", metrics_interval=0.1)) as url:
        call = eng.submit(sid, b"The lamp", SamplingParams(max_tokens=4000, temperature=1.0,
                                                           seed=1))
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url + "/#key=k")
                page.wait_for_function(
                    "() => +document.getElementById('brain').dataset.frames >= 2", timeout=20000)
                first = page.evaluate(BRAIN_PIXELS)
                draws = int(page.get_attribute("#chart-tps", "data-draws"))
                page.wait_for_function(
                    "n => +document.getElementById('brain').dataset.frames >= n",
                    arg=int(page.get_attribute("#brain", "data-frames")) + 3, timeout=20000)
                second = page.evaluate(BRAIN_PIXELS)
                assert len(first) == eng.adapter.model.config.n_layer
                side = int(eng.adapter.describe()["brain_cells"] ** 0.5)
                assert all(w == side and 0 < lit < side * side for w, lit, _ in second)
                assert [h for *_, h in first] != [h for *_, h in second]
                assert int(page.get_attribute("#chart-tps", "data-draws")) > draws
                assert int(page.get_attribute("#chart-mem", "data-draws")) > 0
                assert float(page.inner_text("#tps")) > 0
                assert page.inner_text("#nsessions") == "1"
                assert sid[:12] in page.inner_text("#sessions")
            finally:
                browser.close()
        call.cancel()
        list(call)
    eng.shutdown()
