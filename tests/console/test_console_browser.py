"""The web console in a real browser (Debian's chromium, headless, through Playwright) against a running
gateway + worker + trainer on the tiny model: each view renders real data; a drag-and-dropped archive
upload appears in the list, with its placement; download and delete; a chat streams tokens; compare mode
shows base and adapter answers side by side with TTFT and tokens/s; the workers view refreshes with load
and tokens/s; a fine-tune job's loss chart gains points while it runs, lists checkpoints and is cancelled,
and a short one ends with its validation loss; user values (a file name, a prompt) that look like HTML
are shown as text; a tenant key sees nothing of another tenant's. Screenshots of each view go to `shots`."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import pytest
from console_page import ConsolePage
from console_support import ADMIN_KEY, KEY_A, KEY_B, api, zipped
from playwright.sync_api import expect

pytestmark = pytest.mark.timeout(360)  # the first test also waits for the cluster to start
XSS = "<img src=x onerror=alert(1)>"
RECORDS = [{"prompt": "two plus two is", "completion": " four."},
           {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"}]}] * 8


@pytest.fixture(scope="module")
def admin(browser, console_cluster):
    page = ConsolePage(browser, console_cluster["url"], ADMIN_KEY, "admin key")
    yield page
    page.close()


def drop_archive(page, filename: str, data: bytes) -> None:
    """A real `drop` event on the drop zone carrying the archive as a File (what dragging it in delivers)."""
    page.evaluate("""([name, b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'application/zip'}));
        const zone = document.getElementById('dropzone');
        zone.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
        zone.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [filename, base64.b64encode(data).decode()])


def test_adapters_upload_by_drop_placement_download_delete(admin, console_cluster, lora_dir, shots, tmp_path):
    page = admin.page
    admin.open("adapters")
    drop_archive(page, "console-lora.zip", zipped(lora_dir))
    expect(page.locator("#upload-picked")).to_have_text("console-lora.zip")
    expect(page.locator("#upload-name")).to_have_value("console-lora")  # named after the archive
    page.click("#upload-form button[type=submit]")
    expect(page.locator("#upload-status")).to_have_text("stored console-lora@1")
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 1
    row = page.locator('#adapters-table tr[data-model="console-lora@1"]')
    expect(row).to_contain_text("lora")
    expect(row).to_contain_text("admin")  # the owner: the admin key's tenant

    # served once → resident on the worker: the list shows where (admin keys see placement)
    with api(console_cluster, ADMIN_KEY) as c:
        r = c.post("/v1/completions", json={"model": "console-lora", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
    admin.open("adapters")
    deadline = time.monotonic() + 20
    while "w0" not in row.locator("td.held").inner_text() and time.monotonic() < deadline:
        page.wait_for_timeout(300)
        admin.open("adapters")
    expect(row.locator("td.held")).to_contain_text(re.compile(r"w0 \((device|host)\)"))

    with page.expect_download() as dl:
        row.get_by_role("button", name="Download").click()
    saved = tmp_path / "dl.zip"
    dl.value.save_as(saved)
    assert saved.read_bytes()[:2] == b"PK" and dl.value.suggested_filename == "console-lora-1.zip"

    # the same adapter picked as a folder (webkitdirectory), under another name, then deleted
    page.set_input_files("#adapter-folder", str(lora_dir))
    expect(page.locator("#upload-picked")).to_contain_text(f"{lora_dir.name}/adapter_config.json")
    page.fill("#upload-name", "console-doomed")
    page.click("#upload-form button[type=submit]")
    doomed = page.locator('#adapters-table tr[data-model="console-doomed@1"]')
    expect(doomed).to_be_visible()
    admin.shot(shots, "adapters")
    doomed.get_by_role("button", name="Delete").click()
    doomed.get_by_role("button", name="Really delete?").click()
    expect(doomed).to_have_count(0)
    admin.check_clean()


def test_playground_streams_a_chat_and_compares_side_by_side(admin, console_cluster, shots):
    page = admin.page
    admin.open("playground")
    pane = page.locator('.pane[data-pane="0"]')
    expect(pane.locator("select.target option", has_text="console-lora@1")).to_have_count(1)
    page.fill("#play-temp", "0")
    page.fill("#play-max", "24")
    page.fill("#play-prompt", XSS)  # the user's own text, echoed in the transcript: shown as text
    page.click("#play-send")
    expect(pane).to_have_attribute("data-state", "done", timeout=60_000)
    assert int(pane.get_attribute("data-chunks")) > 1  # the answer arrived as many streamed chunks
    expect(pane.locator(".msg.user .text")).to_have_text(XSS)
    expect(pane.locator(".stats")).to_contain_text(re.compile(r"TTFT \d+ ms · [\d.]+ tokens/s · \d+ tokens"))

    page.click("#play-clear")
    page.select_option("#play-count", "3")
    panes = [page.locator(f'.pane[data-pane="{i}"]') for i in range(3)]
    panes[0].locator("select.target").select_option("model")
    panes[1].locator("select.target").select_option("console-lora@1")
    panes[2].locator("select.target").select_option("__merge__")
    panes[2].locator("input.merge-ids").fill("console-lora:0.5")
    page.fill("#play-prompt", "the quick brown fox")
    page.click("#play-send")
    for p in panes:
        expect(p).to_have_attribute("data-state", "done", timeout=60_000)
        expect(p.locator(".stats")).to_contain_text(re.compile(r"TTFT \d+ ms · [\d.]+ tokens/s"))
    answers = [p.locator(".msg.assistant .text").last.inner_text() for p in panes]
    assert all(answers), answers
    assert answers[0] != answers[1], answers  # base and adapter differ
    admin.shot(shots, "playground")
    admin.check_clean()


def medusa_heads(console_cluster, folder) -> list[tuple]:
    """Random Medusa heads for the tiny base model, as upload files."""
    import torch

    from workers.adapters.medusa import init_medusa, write_medusa
    from workers.model.config import DecoderConfig

    base = DecoderConfig.from_folder(console_cluster["model"])
    heads = write_medusa(folder, init_medusa(base, 3, generator=torch.Generator().manual_seed(1)))
    return [("files", (p.name, p.read_bytes())) for p in sorted(heads.iterdir()) if p.is_file()]


def test_workers_view_refreshes_load_tokens_per_s_and_medusa(admin, console_cluster, shots, tmp_path):
    page = admin.page
    with api(console_cluster, ADMIN_KEY) as c:  # heads for the base: its requests decode speculatively
        r = c.post("/v1/adapters", data={"name": "console-heads", "kind": "medusa"},
                   files=medusa_heads(console_cluster, tmp_path / "heads"))
        assert r.status_code == 201, r.text
    admin.open("workers")
    row = page.locator('#workers-table tr[data-worker="w0"]')
    expect(row).to_contain_text("console-lora@1")  # resident, with its tier
    expect(row).to_contain_text(re.compile(r"/8 \(gateway \d+\)"))  # load: in flight / capacity
    stop = threading.Event()

    def traffic() -> None:  # bounded: stops when the test has seen tokens/s, or after 60 s
        with api(console_cluster, ADMIN_KEY) as c:
            deadline = time.monotonic() + 60
            while not stop.is_set() and time.monotonic() < deadline:
                for model in ("console-lora", "model"):
                    c.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 32,
                                                    "ignore_eos": True})

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        first = page.locator("#workers-updated").inner_text()
        expect(page.locator("#workers-updated")).not_to_have_text(first, timeout=5_000)  # refreshed by itself
        tps = row.locator("td.tps")
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not float(tps.inner_text() or 0) > 0:
            page.wait_for_timeout(250)
        assert float(tps.inner_text()) > 0
        expect(row.locator("td.medusa")).to_contain_text(re.compile(r"base: [\d.]+ tok/step, heads \d+%"))
        admin.shot(shots, "workers")
    finally:
        stop.set()
        t.join(60)
    expect(row.locator("td.queue")).to_have_text(re.compile(r"^\d+$"))
    admin.check_clean()


def test_finetune_file_errors_live_loss_chart_checkpoints_cancel(admin, console_cluster, shots, tmp_path):
    page = admin.page
    admin.open("finetune")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{\"prompt\": 3}\n")
    page.set_input_files("#train-file", str(bad))
    page.click("#file-form button[type=submit]")
    expect(page.locator("#file-error")).to_contain_text("line 2")

    good = tmp_path / f"{XSS}.jsonl"  # a user-chosen name that looks like HTML: the gateway keeps a safe basename
    good.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    page.set_input_files("#train-file", str(good))
    page.click("#file-form button[type=submit]")
    expect(page.locator("#file-status")).to_contain_text("uploaded file-")
    expect(page.locator("#files-table td.filename")).to_have_text("_img_src_x_onerror_alert_1_.jsonl")
    file_id = page.locator("#files-table tr[data-file]").first.get_attribute("data-file")

    page.select_option("#job-train", file_id)
    page.select_option("#job-valid", file_id)
    page.select_option("#job-method", "lora")
    for name, value in {"rank": "4", "epochs": "400", "batch_size": "4", "max_seq_len": "64"}.items():
        page.fill(f'#job-params input[name="{name}"]', value)
    page.fill("#job-suffix", "console")
    page.click("#job-form button[type=submit]")
    expect(page.locator("#job-create-status")).to_contain_text("created ftjob-")
    chart = page.locator("#loss-chart")
    status = page.locator("#job-status")
    expect(status).to_have_attribute("data-status", "running", timeout=60_000)
    expect(chart).not_to_have_attribute("data-points", "0", timeout=60_000)
    seen = int(chart.get_attribute("data-points"))
    deadline = time.monotonic() + 60
    while int(chart.get_attribute("data-points")) <= seen and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert int(chart.get_attribute("data-points")) > seen  # the curve grew while the job ran
    assert status.get_attribute("data-status") == "running"
    expect(page.locator("#checkpoints-table tbody tr td").first).to_have_text(re.compile(r"^\d+$"), timeout=60_000)
    expect(page.locator("#loss-chart canvas")).to_have_count(1)
    admin.shot(shots, "finetune")
    page.click("#job-cancel")
    expect(status).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(page.locator("#job-cancel")).to_be_disabled()
    expect(page.locator("#jobs-table td.status").first).to_have_text("cancelled", timeout=10_000)

    # a short job runs to its end: the validation loss joins the chart, the job names its adapter
    page.fill('#job-params input[name="epochs"]', "1")
    page.click("#job-form button[type=submit]")
    expect(status).to_have_attribute("data-status", "succeeded", timeout=90_000)
    expect(chart).to_have_attribute("data-valid-points", "1")
    expect(status).to_contain_text(re.compile(r"→ ft.model.console.ftjob-"))
    admin.check_clean()


def test_a_tenant_key_sees_nothing_of_another_tenants(browser, console_cluster, lora_dir, tmp_path):
    with api(console_cluster, KEY_A) as a, api(console_cluster, KEY_B) as b:
        files = [("files", (p.name, p.read_bytes())) for p in sorted(lora_dir.iterdir()) if p.is_file()]
        assert a.post("/v1/adapters", data={"name": "secret-of-a"}, files=files).status_code == 201
        assert b.post("/v1/adapters", data={"name": "mine-of-b"}, files=files).status_code == 201
        shared = a.post("/v1/adapters", data={"name": "shared-by-a", "public": "true"}, files=files)
        assert shared.status_code == 201, shared.text
        train = "\n".join(json.dumps(r) for r in RECORDS).encode()
        assert a.post("/v1/files", files={"file": ("secret-a-train.jsonl", train)}).status_code == 200
        assert b.post("/v1/files", files={"file": ("b-train.jsonl", train)}).status_code == 200
    tenant = ConsolePage(browser, console_cluster["url"], KEY_B, "tenant key")
    try:
        page = tenant.page
        expect(page.locator('#tabs [data-view="workers"]')).to_be_hidden()  # no workers, no placement
        expect(page.locator('#adapters-table tr[data-model="mine-of-b@1"]')).to_be_visible()
        expect(page.locator('#adapters-table tr[data-model="mine-of-b@1"] td.held')).to_have_text("admin key only")
        public = page.locator('#adapters-table tr[data-model="tenant-a/shared-by-a@1"]')  # by its full name
        expect(public).to_contain_text("tenant-a")
        assert KEY_B not in page.url  # the key lives in this tab's sessionStorage only
        assert page.evaluate("[sessionStorage.getItem('adapterd.apiKey'), localStorage.length]") == [KEY_B, 0]
        seen = page.locator("body").inner_text()
        tenant.open("finetune")
        expect(page.locator("#files-table td.filename")).to_have_text("b-train.jsonl")
        expect(page.locator("#jobs-table tbody")).to_contain_text("no jobs yet")
        seen += page.locator("body").inner_text()
        tenant.open("playground")
        expect(page.locator('.pane[data-pane="0"] select.target option', has_text="mine-of-b@1")).to_have_count(1)
        seen += "\n".join(page.locator('.pane select.target option').all_inner_texts())
        page.goto(console_cluster["url"] + "/ui/#workers")  # asking for the workers view lands on adapters
        expect(page.locator("#view-adapters")).to_be_visible()
        expect(page.locator("#view-workers")).to_be_hidden()
        seen += page.locator("body").inner_text()
        for other in ("secret-of-a", "secret-a-train", "console-", XSS, "ftjob-", "w0"):
            assert other not in seen, other
        tenant.check_clean()
    finally:
        tenant.close()
