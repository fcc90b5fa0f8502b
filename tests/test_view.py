"""view.py: the page of a real run of the scripted client (conftest.make_runs, or
tests/scripted_runs.py on the command line), read as data here and driven in headless
chromium (Playwright with the system's chromium).

The browser tests skip, with one line saying why, where chromium or Playwright is missing;
.ci/run installs Debian's chromium, so in CI they run. VIEW_SCREENSHOT=images/viewer.png
saves the README's screenshot."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import run_files
import view
from conftest import INJECTED, ROOT, make_runs, one_error_line
from metrics import UNUSABLE_FIGURES, UNUSABLE_KEYS
from critic import Critic
from env import Conversation, turn_prompt_cuts
from run_files import ConversationRecord, TurnRecord
from tasks import get_task

CHROMIUM, FLAGS = view.CHROMIUM, view.CHROMIUM_FLAGS


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """[trained run, random-policy baseline] on the same 12 test cases and seed."""
    return make_runs(str(tmp_path_factory.mktemp("scripted")))


@pytest.fixture(scope="module")
def page_path(runs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("page") / "view.html")
    view.write_page(runs, out)
    return out


def read_lines(run, split="test"):
    with open(os.path.join(run, f"{split}_conversations.jsonl")) as f:
        return [json.loads(line) for line in f]


def data_block(page, name):
    return re.search(rf'<script type="application/json" id="{name}">(.*?)</script>', page,
                     re.S).group(1)


def cli(*args):
    return subprocess.run([sys.executable, "view.py", *args], cwd=ROOT, capture_output=True,
                          text=True)


# ---- the page as data -----------------------------------------------------------------

@pytest.mark.slow
def test_every_conversation_is_data_and_no_llm_markup_reaches_the_html(runs, page_path):
    page = open(page_path, encoding="utf-8").read()
    lines = data_block(page, "conversations-data").split("\n")
    train, test = read_lines(runs[0], "train"), read_lines(runs[0]) + read_lines(runs[1])
    assert len(lines) == len(train) + len(test)
    assert [json.loads(line)["case_id"] for line in lines] == [
        c["case_id"] for c in train + read_lines(runs[0]) + read_lines(runs[1])]
    assert any(INJECTED in str(json.loads(line)) for line in lines)  # it is there...
    for fragment in ("<script>window", "</textarea>", "<img", "<b>bold"):
        assert fragment not in page  # ...but only as JSON escapes
    # the one script that may run is the page's own, by its hash
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page and page.count("<script>") == 1
    rows = json.loads(data_block(page, "runs-data").replace("\\u003c", "<"))["rows"]
    assert {row["split"] for row in rows} == {"train", "test"}


@pytest.mark.slow
def test_the_docs_name_the_splits_that_a_run_writes_and_the_page_shows(runs, page_path):
    written = {name[:-len("_conversations.jsonl")] for name in os.listdir(runs[0])
               if name.endswith("_conversations.jsonl")}
    page = open(page_path, encoding="utf-8").read()
    rows = json.loads(data_block(page, "runs-data").replace("\\u003c", "<"))["rows"]
    assert written == {row["split"] for row in rows} == set(run_files.SPLITS) == {"train", "test"}
    for path in ("docs/outputs.md", "view.py"):
        text = " ".join(open(os.path.join(ROOT, path), encoding="utf-8").read().split())
        assert "train and test" in text and "no valid ones" in text, path
        assert "train, valid, test" not in text and "train, valid and test" not in text, path


def judged_record(task, case, answers, orders=None, answer_orders=None):
    """A turn's record with the critic's reading of the answers, as end_turn records it."""
    verdict = Critic(task, llm=None).from_answers(case, answers, orders, answer_orders)
    verdict.orders = orders or [list(range(len(task.verdicts)))]
    return TurnRecord().set_verdict(verdict, None)


def test_critic_answers_are_read_by_the_critics_rules():
    esc = get_task("esc")
    readings = view.critic_readings(esc, TurnRecord(critic_answers=[
        "4", "Option 9", "option 1 or option 3", "I cannot tell.", 7]))
    assert readings[0] == {"option": 3, "text": esc.verdicts[3], "shown_as": 4}
    assert readings[1]["option"] is None and "9, which is not an option" in readings[1]["why"]
    assert "several options (1, 3)" in readings[2]["why"]
    assert "names no option" in readings[3]["why"] and readings[4]["why"] == "not a text"
    cb = get_task("cb")
    case = {"buyer_price": 100, "seller_price": 200}
    deal, no_price = view.critic_readings(cb, judged_record(cb, case, ["2, at $150", "2"]))
    assert deal["option"] == 1 and deal["price"] == 150 and "why" not in deal
    assert no_price["why"] == "a deal without a usable price"
    # --critic logits: the answers to the price question, with the prices Critic.ask_prices
    # read (None: not plausible)
    price, no_price = view.critic_readings(cb, TurnRecord(
        critic_answers=["$150", "about 9000"], critic_prices=[150.0, None]), logits=True)
    assert price == {"option": None, "price": 150} and no_price["why"] == "no plausible price"
    conversation = ConversationRecord(case=case, records=[
        TurnRecord(deal_price=150, critic_answers=["1"]),  # a run older than critic_reads
        judged_record(cb, case, ["1, 150", "1"], [[1, 0], [0, 1]], [0, 1])])
    first, second = view.annotate(conversation, cb)["records"]
    assert first["view"]["sale_to_list"] == 0.5
    assert first["view"]["critic_readings"][0]["option"] == 0
    # shuffled options: each answer is read in the order it was shown
    shuffled, fixed = second["view"]["critic_readings"]
    assert shuffled["option"] == 1 and shuffled["shown_as"] == 1 and shuffled["price"] == 150
    assert fixed["option"] == 0 and fixed["shown_as"] == 1


def test_turn_prompt_cuts_are_the_cuts_since_the_last_record():
    conversation = Conversation(case={}, turns=[])
    conversation.prompt_cuts = {"user": 1, "turns_dropped": 2}
    conversation.records = [{"prompt_cuts": {"user": 1, "turns_dropped": 2}}, {}]
    assert turn_prompt_cuts(conversation) == {}
    conversation.prompt_cuts = {"user": 2, "critic": 1, "turns_dropped": 2}
    assert turn_prompt_cuts(conversation) == {"user": 1, "critic": 1}


@pytest.mark.slow
def test_no_run_or_an_unknown_flag_is_one_error_line():
    for args, fragment in (((), "the following arguments are required: RUN"),
                           (("--nope", "x"), "unrecognized arguments: --nope")):
        line = one_error_line("view.py", *args)
        assert line.startswith(f"error: {fragment}") and "view.py --help" in line


def test_an_out_that_is_no_html_page_is_refused_and_the_run_kept(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs[0], run)
    metrics = os.path.join(run, "test_metrics.json")
    before = open(metrics).read()
    line = one_error_line("view.py", run, "--out", metrics)
    assert line.startswith(f"error: --out {metrics} is not an .html file.")
    assert open(metrics).read() == before


def test_a_malformed_line_is_one_error_line_or_with_skip_bad_listed(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs[0], run)
    path = os.path.join(run, "test_conversations.jsonl")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:  # line 3 cut short, as by a kill while writing
        f.write("\n".join(lines[:2] + [lines[2][:50]] + lines[3:]) + "\n")
    done = cli(run, "--out", str(tmp_path / "page.html"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith(f"error: {path}, line 3: not JSON")
    assert "--skip_bad" in done.stderr
    assert not os.path.exists(tmp_path / "page.html")
    done = cli(run, "--out", str(tmp_path / "page.html"), "--skip_bad")
    assert done.returncode == 0, done.stderr
    assert f"skipped: {path}, line 3" in done.stderr
    page = open(tmp_path / "page.html").read()
    assert len(data_block(page, "conversations-data").split("\n")) == (
        len(lines) - 1 + len(read_lines(run, "train")))
    with open(os.path.join(run, "test_metrics.json"), "w") as f:
        f.write('{"task": "esc",')  # cut short
    for folder, fragment in ((run, "cannot read " + os.path.join(run, "test_metrics.json")),
                             (str(tmp_path / "none"), "is not a folder"),
                             (str(tmp_path), "no conversations")):
        if folder == str(tmp_path):
            shutil.rmtree(run)
        done = cli(folder, "--skip_bad")
        assert done.returncode == 2 and done.stderr.startswith("error: ")
        assert fragment in done.stderr and len(done.stderr.splitlines()) == 1


# ---- in the browser -------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    """A headless chromium page; skips with one line where there is none."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no chromium at {CHROMIUM}: install it (apt-get install chromium) to "
                    "run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -r requirements.txt)")
    profile = tempfile.mkdtemp(prefix="view-chromium-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def open_page(context, path):
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto("file://" + os.path.abspath(path))
    page.wait_for_function("window.viewReady !== undefined")
    assert page.evaluate("window.viewReady") > 0 and not errors, errors
    page.errors = errors
    return page


def shown_rows(page):
    return [int(i) for i in page.eval_on_selector_all(
        "#rows tr", "rows => rows.map(row => row.dataset.index)")]


@pytest.mark.slow
def test_browser_filters_by_outcome_and_shows_a_turn_with_candidates_and_critic(
        browser, runs, page_path):
    page = open_page(browser, page_path)
    trained = read_lines(runs[0])
    page.select_option("#f-run", "0")  # the runs in the order given: trained, baseline
    page.select_option("#f-split", "test")
    page.select_option("#f-outcome", "success")
    successes = [c for c in trained if c["outcome"] == "success"]
    assert 0 < len(successes) < len(trained)
    assert len(shown_rows(page)) == len(successes)
    assert page.inner_text("#count").startswith(f"{len(successes)} of ")
    page.select_option("#f-outcome", "time limit")
    assert len(shown_rows(page)) == len(trained) - len(successes)
    page.select_option("#f-outcome", "")
    page.fill("#f-case", "2")
    page.click("#rows tr >> nth=0")
    conversation = next(c for c in trained if c["case_id"] == 2)
    record = conversation["records"][0]
    turn = page.locator(".turn").first
    text = turn.inner_text()
    assert page.locator(".turn").count() == len(conversation["records"])
    assert text.startswith("Turn 1") and record["action"] in text
    for candidate in record["candidates"]:
        assert candidate["action"] in text and str(candidate["q"]) in text
    assert record["system"] in text and record["user"] in text
    answers = turn.locator(".critic li")
    assert answers.count() == len(record["critic_answers"])
    for k, answer in enumerate(record["critic_answers"]):
        shown = answers.nth(k).inner_text()
        assert shown.startswith(answer)
        assert ("unusable: names" in shown) == (answer in ("Option 9", "I cannot tell."))
    assert f"reward {record['reward']:g}" in text
    assert "greedy" in text
    assert page.evaluate("window.injected") is None and not page.errors


@pytest.mark.slow
def test_browser_shows_injected_markup_as_text_and_runs_none_of_it(browser, runs, page_path):
    page = open_page(browser, page_path)
    page.select_option("#f-split", "test")
    page.fill("#f-case", "1")
    page.click("#rows tr >> nth=0")
    users = page.locator(".bubble.user .text")
    assert users.first.inner_text() == INJECTED
    assert INJECTED in page.locator(".critic").first.inner_text()
    assert page.locator("#detail img, #detail b, #detail textarea").count() == 0
    assert page.evaluate("window.injected") is None and not page.errors


@pytest.mark.slow
def test_browser_side_by_side_marks_the_first_turn_where_the_actions_differ(
        browser, runs, page_path):
    baseline = {c["case_id"]: c for c in read_lines(runs[1])}
    trained = {c["case_id"]: c for c in read_lines(runs[0])}

    def first_difference(a, b):
        actions = [[r["action"] for r in c["records"]] for c in (a, b)]
        for turn in range(max(map(len, actions))):
            if len({str(x[turn]) if turn < len(x) else "end" for x in actions}) > 1:
                return turn + 1
        return None

    differing = {case: first_difference(baseline[case], trained[case]) for case in trained}
    case, turn = next((c, t) for c, t in sorted(differing.items()) if t)
    page = open_page(browser, page_path)
    page.select_option("#f-split", "test")
    page.fill("#f-case", str(case))
    page.select_option("#f-run", "0")
    page.click("#rows tr >> nth=0")
    page.click("#side-by-side")
    assert page.locator(".pair .column").count() == 2
    assert page.inner_text("#diverge").startswith(f"The actions first differ at turn {turn}:")
    marked = page.locator(".turn.diverges")
    assert marked.count() == 2 and {marked.nth(i).get_attribute("data-turn")
                                    for i in range(2)} == {str(turn)}
    for column, run in ((0, trained), (1, baseline)):
        text = page.locator(".pair .column").nth(column).inner_text()
        assert run[case]["records"][turn - 1]["action"] in text
    same = next((c for c, t in differing.items() if t is None), None)
    if same is not None:
        page.fill("#f-case", str(same))
        page.click("#rows tr >> nth=0")
        page.click("#side-by-side")
        assert page.inner_text("#diverge").startswith("The runs chose the same action")
        assert page.locator(".turn.diverges").count() == 0
    assert page.evaluate("window.injected") is None and not page.errors


@pytest.mark.slow
def test_browser_filters_explored_training_turns_and_sorts_by_reward(browser, runs, page_path):
    train = read_lines(runs[0], "train")
    page = open_page(browser, page_path)
    page.select_option("#f-split", "train")
    page.select_option("#f-explored", "yes")
    explored = [c for c in train if any(r["explored"] for r in c["records"])]
    assert 0 < len(explored) and len(shown_rows(page)) == len(explored)
    page.select_option("#f-explored", "")
    page.select_option("#f-unusable", "yes")
    assert len(shown_rows(page)) == sum(
        any(r.get(k) for r in c["records"] for k in view.UNUSABLE_KEYS) for c in train)
    page.select_option("#f-unusable", "")
    page.select_option("#sort", "return-desc")
    returns = page.eval_on_selector_all("#rows tr td:nth-child(7)",
                                        "cells => cells.map(cell => Number(cell.textContent))")
    assert returns == sorted(returns, reverse=True) and len(returns) == len(train)
    page.select_option("#f-action", "Question")
    assert len(shown_rows(page)) == sum(
        any(r["action"] == "Question" for r in c["records"]) for c in train)
    assert "test: SR " in page.inner_text("#runs summary >> nth=0")  # folded: two runs
    page.click("details.run > summary >> nth=0")
    page.click("details.run > summary >> nth=1")
    assert page.locator("#runs img").count() >= 6  # the runs' figures, from data: URIs
    assert page.evaluate("[...document.querySelectorAll('#runs img')]"
                         ".every(image => image.naturalWidth > 0)")
    assert "learning_rate" in page.inner_text("#runs")


@pytest.mark.slow
def test_browser_unknown_and_missing_fields_and_skipped_lines_keep_the_page(
        browser, runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs[1], run)
    path = os.path.join(run, "test_conversations.jsonl")
    conversations = read_lines(run)
    conversations[0]["records"][0]["critic_orders"] = [[2, 0, 1, 3]]  # a newer field
    conversations[0]["reviewer"] = "someone"
    conversations[0]["case"] |= {"buyer_price": 100, "seller_price": 200}  # as cb's cases
    conversations[0]["records"][0]["deal_price"] = 150.0
    conversations[1] = {"case_id": conversations[1]["case_id"], "records": [{"turn": 1}]}
    with open(path, "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations)
        f.write('{"case_id": 99, "records": [\n')  # a truncated last line
    out = str(tmp_path / "page.html")
    view.write_page([run], out, skip_bad=True)
    page = open_page(browser, out)
    assert "1 malformed line left out" in page.inner_text("#bad")
    assert f"{path}, line {len(conversations) + 1}" in page.inner_text("#bad")
    page.fill("#f-case", str(conversations[0]["case_id"]))
    page.click("#rows tr >> nth=0")
    text = page.inner_text("#detail")
    assert "critic_orders" in text and "[[2,0,1,3]]" in text and "reviewer" in text
    assert "deal price 150 · SL 0.5" in page.inner_text(".turn")
    page.fill("#f-case", str(conversations[1]["case_id"]))
    page.click("#rows tr >> nth=0")
    assert page.inner_text(".turn").startswith("Turn 1 · action none") and not page.errors


@pytest.mark.slow
def test_browser_screenshot_of_a_conversation(browser, page_path, tmp_path):
    page = open_page(browser, page_path)
    page.select_option("#f-split", "test")
    page.select_option("#f-run", "0")
    page.click("#rows tr >> nth=2")
    page.click("details.run > summary >> nth=0")  # the trained run's metrics and figures
    page.set_viewport_size({"width": 1400, "height": 1300})
    page.evaluate("window.scrollTo(0, 0)")
    shot = str(tmp_path / "viewer.png")
    page.screenshot(path=shot)
    assert open(shot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VIEW_SCREENSHOT"):
        shutil.copy(shot, os.environ["VIEW_SCREENSHOT"])


@pytest.mark.slow
def test_bench_view_prints_the_pages_size_and_times(browser, runs, capsys):
    import bench

    figures = bench.view_figures(runs, repeats=1, browser=browser)
    assert figures["conversations"] == sum(len(read_lines(runs[0], split))
                                          for split in ("train", "test")) + len(read_lines(runs[1]))
    assert figures["megabytes"] > 0 and figures["open_seconds"] > 0
    assert figures["filter_seconds"] > 0 and figures["conversation_seconds"] > 0
    assert "MB" in capsys.readouterr().out


@pytest.mark.slow
def test_browser_filters_by_user_persona_and_shows_the_persona_and_cost(browser, runs, tmp_path):
    """A run with --user_personas: the list filters by persona; a conversation shows its
    persona and what its LLM calls cost (its own turns and its planner's)."""
    folder = str(tmp_path / "persona_run")
    shutil.copytree(runs[0], folder)
    conversations = read_lines(folder)
    for i, c in enumerate(conversations):
        c["persona"] = {"name": ["calm/analytical", "anxious/directive"][i % 2],
                        "text": f"You are persona {i % 2}."}
    with open(os.path.join(folder, "test_conversations.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations)
    out = str(tmp_path / "view.html")
    view.write_page([folder], out)
    page = open_page(browser, out)
    page.select_option("#f-split", "test")
    page.select_option("#f-persona", "anxious/directive")
    assert len(shown_rows(page)) == len(conversations) // 2
    page.click("#rows tr >> nth=0")
    shown = page.inner_text("#detail")
    first = next(c for c in conversations if c["persona"]["name"] == "anxious/directive")
    assert "user persona anxious/directive: You are persona 1." in shown
    cost = first["cost"]
    assert (f"LLM cost: turns {cost['conversation']['calls']} calls, "
            f"{cost['conversation']['prompt_tokens']} prompt tokens run" in shown)
    assert f"planner {cost['planner']['calls']} calls" in shown
    assert "persona\t" not in shown and "cost\t" not in shown and not page.errors  # not "other"


def strict_loads(text):
    """JSON as the browser's JSON.parse reads it: NaN and Infinity are not JSON."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    return json.loads(text.replace("\\u003c", "<"), parse_constant=refuse)


def test_a_nan_or_infinity_in_a_run_reaches_the_page_as_text_that_json_parse_reads(
        runs, tmp_path):
    """A diverged run (a NaN loss in its metrics, a NaN Q-value or an infinite reward in a
    record) is written by Python's json, whose NaN the browser's JSON.parse refuses."""
    run = str(tmp_path / "run")
    shutil.copytree(runs[0], run)
    metrics = json.load(open(os.path.join(run, "test_metrics.json")))
    metrics["mean_return"] = float("nan")
    with open(os.path.join(run, "test_metrics.json"), "w") as f:
        json.dump(metrics, f)
    conversations = read_lines(run)
    conversations[0]["records"][0]["candidates"][0]["q"] = float("nan")
    conversations[0]["records"][0]["reward"] = float("-inf")
    conversations[0]["total_reward"] = float("inf")
    with open(os.path.join(run, "test_conversations.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations)
    page, _ = view.build_page([run])
    data = strict_loads(data_block(page, "runs-data"))
    assert data["runs"][0]["metrics"]["test"]["mean_return"] == "NaN"
    row = next(row for row in data["rows"] if row["split"] == "test"
               and row["case_id"] == conversations[0]["case_id"])
    assert row["return"] == "Infinity"
    lines = [strict_loads(line) for line in data_block(page, "conversations-data").split("\n")]
    shown = next(c for c in lines if c["case_id"] == conversations[0]["case_id"]
                 and c["records"][0]["reward"] == "-Infinity")
    assert shown["records"][0]["candidates"][0]["q"] == "NaN"
    assert shown["total_reward"] == "Infinity"


# every kind of text that could end the page's data, run a script or break a table
ODD_TEXT = ("<!--<script>window.injected = 3</script>--> `code` | a | b\nline two\u2028"
            "\u2029 &amp; \U0001F600 " + INJECTED)


@pytest.mark.slow
def test_browser_shows_a_run_s_texts_everywhere_as_text_and_loads_nothing(
        browser, runs, tmp_path):
    """The texts of a run's files, planted where the page shows them: a case's field, the
    persona's name and text, an MCTS tree's action, a metric, the run folder's name, and a
    NaN Q-value. Each is shown as it is, no script of theirs runs, and the page asks for
    nothing but itself. The conversation's cost shows its unread prior's part too."""
    folder = str(tmp_path / "run <script>&amp; <b>x")
    shutil.copytree(runs[0], folder)
    metrics = json.load(open(os.path.join(folder, "test_metrics.json")))
    metrics["judge"] = {"critic_llm": ODD_TEXT}
    metrics["mean_return"] = float("nan")  # a diverged run's
    with open(os.path.join(folder, "test_metrics.json"), "w") as f:
        json.dump(metrics, f)
    conversations = read_lines(folder)
    shown = conversations[0]
    shown["case"]["situation"] = ODD_TEXT
    shown["persona"] = {"name": ODD_TEXT, "text": ODD_TEXT}
    record = shown["records"][0]
    record["candidates"][0]["q"] = float("nan")
    shown["cost"]["unread_prior"] = {"calls": 3, "prompt_tokens": 120,  # gdpzero's, say
                                     "prompt_tokens_reused": 0, "generated_tokens": 0}
    record["search"] = {"simulations": 2, "simulated_turns": 3, "errors": {"critic_invalid": 1},
                        "tree": [{"action": ODD_TEXT, "prior": 0.5, "visits": 2, "value": 0.25,
                                  "children": [{"action": "Question", "prior": 0.2, "visits": 1,
                                                "value": 1.0, "children": []}]}]}
    with open(os.path.join(folder, "test_conversations.jsonl"), "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conversations)
    out = str(tmp_path / "page.html")
    view.write_page([folder], out)
    requests = []
    def asked(request):
        requests.append(request.url)
    browser.on("request", asked)
    page = open_page(browser, out)
    assert page.title() == "conversations: " + os.path.basename(folder)
    assert page.inner_text("details.run > summary").endswith(" · mean_return NaN")
    page.select_option("#f-split", "test")
    page.fill("#f-case", str(shown["case_id"]))
    page.click("#rows tr >> nth=0")
    text = page.evaluate("document.getElementById('detail').textContent")
    assert f"user persona {ODD_TEXT}: {ODD_TEXT}" in text
    assert ("; unread prior 3 calls, 120 prompt tokens run + 0 reused, 0 generated"
            in page.inner_text(".cost"))
    assert page.evaluate("[...document.querySelectorAll('#detail .kv td')]"
                         ".map(cell => cell.textContent)").count(ODD_TEXT) == 1  # the case
    search = page.locator(".search")
    assert search.locator("summary").text_content() == (
        "MCTS: 2 simulations, 3 simulated turns · unusable answers in them: critic_invalid 1")
    nodes = search.locator("li")
    assert nodes.nth(0).evaluate("node => node.firstChild.textContent") == (
        ODD_TEXT + " · visits 2 · value 0.25 · prior 0.5")
    assert nodes.nth(1).text_content() == "Question · visits 1 · value 1 · prior 0.2"
    assert "\tNaN" in page.locator("table.candidates tr >> nth=1").inner_text()
    assert ODD_TEXT in page.evaluate("document.getElementById('runs').textContent")
    assert page.evaluate("document.scripts.length") == 3  # the two data blocks and the page's
    assert page.locator("body b, body img:not(#runs img), body textarea").count() == 0
    assert page.evaluate("window.injected") is None and not page.errors
    browser.remove_listener("request", asked)
    assert len(requests) == 1 and requests[0].startswith("file://"), requests


def test_the_page_template_names_nothing_outside_the_page():
    """The page opens offline: no font, style sheet, script or image from elsewhere, and a
    policy that refuses any request a run's text could make (img-src: data: URIs only)."""
    template = open(view.TEMPLATE, encoding="utf-8").read()
    policy = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]*)"',
                       template).group(1)
    assert policy.split("; ")[:2] == ["default-src 'none'", "img-src data:"]
    without_policy = template.replace('http-equiv="Content-Security-Policy"', "")
    for pattern in (r"https?:", r"\b(src|href|srcset|action)\s*=\s*[\"']", r"url\(",
                    r"@import", r"@font-face", r"\bimport\(",
                    r"\b(fetch|XMLHttpRequest|WebSocket|EventSource)\b"):
        assert not re.search(pattern, without_policy), pattern


@pytest.mark.slow
def test_the_page_s_rows_give_the_run_s_test_metrics(runs, page_path):
    """Per run, the test split's rows of the list (outcome, turns, return, unusable
    answers) give the SR, AT, mean return and real-turn unusable answers of its
    test_metrics.json, and the headline shows that file's figures."""
    data = strict_loads(data_block(open(page_path, encoding="utf-8").read(), "runs-data"))
    for index, run in enumerate(runs):
        metrics = json.load(open(os.path.join(run, "test_metrics.json")))
        rows = [row for row in data["rows"] if row["run"] == index and row["split"] == "test"]
        assert len(rows) == metrics["episodes"] == len(read_lines(run))
        success = [row["outcome"] == "success" for row in rows]
        assert sum(success) / len(rows) == pytest.approx(metrics["SR"])
        assert sum(row["turns"] if won else metrics["max_turn"] for row, won in
                   zip(rows, success)) / len(rows) == pytest.approx(metrics["AT"])
        assert sum(row["return"] for row in rows) / len(rows) == pytest.approx(
            metrics["mean_return"])
        real_turns = [UNUSABLE_FIGURES[key] for key in UNUSABLE_KEYS]
        assert sum(row["unusable"] for row in rows) == sum(
            metrics["llm_answers_unusable"].get(name, 0) for name in real_turns)
        shown = data["runs"][index]["metrics"]["test"]
        assert {key: shown[key] for key in ("SR", "AT", "mean_return")} == {
            key: metrics[key] for key in ("SR", "AT", "mean_return")}


def test_a_run_folder_whose_name_is_not_utf8_gets_its_page(runs, tmp_path):
    """A folder name with a byte that is not UTF-8 (Python reads it as a lone surrogate)
    goes into the page's title: it is written as U+FFFD, not a UnicodeEncodeError."""
    run = os.path.join(str(tmp_path), os.fsdecode(b"run\xff"))
    shutil.copytree(runs[1], run)
    out = str(tmp_path / "page.html")
    done = cli(run, "--out", out)
    assert done.returncode == 0, done.stderr
    page = open(out, encoding="utf-8").read()
    assert "<title>conversations: run\ufffd</title>" in page
    assert json.dumps(run) in page  # the folder itself, as a JSON escape
