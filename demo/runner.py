"""`velocity demo`, stage by stage: services -> history ending today -> nightly snapshots -> `velocity train` ->
stream worker and API -> the story through POST /v1/score -> the table, the stream's agreement, the offline check.

Every stage prints one progress line; a failing stage names itself and the log to read. Everything a run writes
lives in its run folder (`$VELOCITY_RUN_DIR/demo/<time>/`: this run's log, the worker's, the API's, training's);
the data goes where every other command looks for it (`$VELOCITY_DATA_DIR`: the history under `demo/`, the
offline store, the models, MLflow), so `velocity serve`, `velocity consistency` and `velocity models list` see it
afterwards. Kafka topics and the Redis key prefix are the configured ones (VELOCITY_KAFKA_TOPIC_*,
VELOCITY_REDIS_KEY_PREFIX).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from rich.console import Console
from rich.markup import escape

from demo import story
from demo.processes import Child, remember, stop_remembered
from featurestore.config import Settings, get_settings

log = logging.getLogger(__name__)
DAY_MS = 86_400_000
#: The demo's stream worker reads in its own consumer group, from the end of the topic (see `_start_at_end`).
GROUP = "velocity-demo"


class DemoFailed(RuntimeError):
    def __init__(self, stage: str, message: str, log_file: Path) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage, self.message, self.log_file = stage, message, log_file


@dataclass
class DemoOptions:
    cards: int = 5_000
    days: int = 28
    seed: int = 7
    json_path: Path | None = None
    keep_running: bool = False
    realtime: bool = True
    api_port: int = 8000
    metrics_port: int = 9469


@dataclass
class Result:
    outcomes: list[story.Outcome]
    verdict: story.Verdict
    agree: bool
    disagreements: list[str]
    offline_ok: bool | None
    model: dict
    exit_code: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Demo:
    STAGES = ("services", "history", "snapshots", "model", "worker + API", "story", "agreement", "offline check")

    def __init__(self, opts: DemoOptions, console: Console | None = None, settings: Settings | None = None) -> None:
        self.opts = opts
        self.out = console or Console()
        self.settings = settings or get_settings()
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        self.demo_root = Path(self.settings.run_dir) / "demo"
        self.run_dir = self.demo_root / stamp
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.run_dir / "demo.log"
        self.data_dir = Path(self.settings.data_dir)
        self.history_path = self.data_dir / "demo" / "history.parquet"
        self.children: list[Child] = []
        self.today = dt.datetime.now(dt.UTC).date()
        self.api_url = f"http://127.0.0.1:{opts.api_port}"
        self._stage_log = self.log_file
        self._current = ""
        self._handler: logging.Handler | None = None

    # ------------------------------------------------------------------------------------------ plumbing

    def _note(self, text: str) -> None:
        with open(self.log_file, "a") as fh:
            fh.write(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {text}\n")

    def _stage(self, i: int, name: str, fn: Callable[[], str], log_file: Path | None = None):
        """Run one stage: a progress line before and after; any failure names the stage and its log."""
        self._stage_log = log_file or self.log_file
        self._current = name
        self.out.print(f"[bold][{i}/{len(self.STAGES)}] {name}[/] …", highlight=False)
        self._note(f"stage {name}: start")
        t0 = time.perf_counter()
        try:
            summary = fn()
        except DemoFailed:
            raise
        except Exception as exc:
            self._note(f"stage {name} failed:\n{traceback.format_exc()}")
            where = self._stage_log
            raise DemoFailed(name, " ".join(str(exc).split())[:600] or type(exc).__name__, where) from None
        took = time.perf_counter() - t0
        self._note(f"stage {name}: done in {took:.1f}s: {summary}")
        self.out.print(f"      {escape(summary)} [dim]({took:.1f} s)[/]", highlight=False, soft_wrap=True)

    def _fail(self, stage: str, message: str, log_file: Path | None = None) -> NoReturn:
        raise DemoFailed(stage, message, log_file or self.log_file)

    def run(self) -> Result:
        t0 = time.perf_counter()
        # Library log lines (Kafka clients, HTTP requests) go to this run's log; the terminal keeps the stages.
        root = logging.getLogger()
        quieted = [(h, h.level) for h in root.handlers]
        for h, _ in quieted:
            h.setLevel(logging.ERROR)
        self._handler = logging.FileHandler(self.log_file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(self._handler)
        self.out.print(f"velocity demo: the seed's story on real Kafka and Redis, with a model trained on a "
                       f"generated history ({self.opts.cards:,} cards, {self.opts.days} days ending today). "
                       f"Logs: {self.run_dir}", highlight=False, soft_wrap=True)
        ok = False
        try:
            self._stage(1, "services", self._services)
            self._stage(2, "history", self._history)
            self._stage(3, "snapshots", self._snapshots)
            self._stage(4, "model", self._train, self.run_dir / "train.log")
            self._stage(5, "worker + API", self._start_children)
            self._stage(6, "story", self._send_story)
            try:
                result = self._report()
            except Exception as exc:
                self._note(f"stage agreement failed:\n{traceback.format_exc()}")
                raise DemoFailed("agreement", " ".join(str(exc).split())[:600] or type(exc).__name__,
                                 self.log_file) from None
            if not self.opts.keep_running:
                self._stop_children()  # the worker rolls its archive spool on the way out
            self._stage(8, "offline check", self._offline_check)
            result.offline_ok = self._offline_ok
            result.exit_code = 0 if result.verdict.ok and result.agree and self._offline_ok else 1
            self._next_steps(result)
            self.out.print(f"done in {time.perf_counter() - t0:.0f} s", highlight=False)
            ok = True
            return result
        finally:
            if ok and self.opts.keep_running:
                remember(self.demo_root / "running.json", self.children)
            else:
                self._stop_children()
            root.removeHandler(self._handler)
            self._handler.close()
            for h, level in quieted:
                h.setLevel(level)

    # ------------------------------------------------------------------------------------------ stages

    def _services(self) -> str:
        from services.manager import ServiceConfig, ServiceError, up
        from stores.kafka_topics import ensure_topics, product_topics
        from stores.redis_online import OnlineStore

        s = self.settings
        host, _, port = s.kafka.bootstrap.split(",")[0].rpartition(":")
        local = host in ("127.0.0.1", "localhost") and s.redis.host in ("127.0.0.1", "localhost")
        lines: list[str] = []
        if local:
            kafka_port = int(port)
            cfg = ServiceConfig(run_dir=Path(s.run_dir), kafka_port=kafka_port,
                                controller_port=int(os.environ.get("VELOCITY_KAFKA_CONTROLLER_PORT", "0"))
                                or kafka_port + 1,
                                redis_port=s.redis.port, kafka_heap=os.environ.get("VELOCITY_KAFKA_HEAP", "512m"))
            self._stage_log = cfg.logs_dir  # kafka-server.log, kafka.out, redis.log
            try:
                lines = up(cfg, echo=lambda m: self._note(str(m)))
            except ServiceError as exc:
                self._fail("services", str(exc), cfg.logs_dir)
        store = OnlineStore(s.redis)
        try:
            store.ping()
        except Exception as exc:
            self._fail("services", f"Redis at {s.redis.host}:{s.redis.port} does not answer ({exc}); start it "
                       "(`velocity services up`) or point VELOCITY_REDIS_HOST/_PORT at yours")
        finally:
            store.close()
        try:
            ensure_topics(s.kafka.bootstrap, product_topics(s.kafka), retention_ms=s.kafka.topic_retention_ms)
        except Exception as exc:
            self._fail("services", f"Kafka at {s.kafka.bootstrap} does not answer ({type(exc).__name__}: {exc}); "
                       "start it (`velocity services up`) or point VELOCITY_KAFKA_BOOTSTRAP at yours")
        for line in lines:
            self._note(line)
        return (f"Kafka {s.kafka.bootstrap} and Redis {s.redis.host}:{s.redis.port} answer"
                + (f" ({'; '.join(lines)})" if lines else "; started elsewhere"))

    def _history(self) -> str:
        from ingest.generate import GenerateConfig, generate_history, write_history

        start = self.today - dt.timedelta(days=self.opts.days)
        # The story is a card attack (SPEC section 9): the demo's history has card chains only. Compromised-merchant
        # episodes (on by default in `velocity generate`) need the merchant's 30-day window and many episodes to be
        # learnt, which a 28-day demo history does not hold: there they only add unexplained fraud to a story that
        # is about velocity (with them, the attack's 2nd transaction fell just under the threshold, 0.0141 < 0.0149).
        cfg = GenerateConfig(cards=self.opts.cards, days=self.opts.days, start=start, seed=self.opts.seed,
                             compromise_rate=0.0)
        cfg.validate(now_ms=_now_ms(), max_future_ms=self.settings.max_future_ms)
        hist = generate_history(cfg)
        write_history(hist.table, self.history_path)
        self.history = hist.table
        s = hist.summary
        return (f"{s['rows']:,} transactions of {s['cards']:,} cards, {start} .. {self.today} 00:00 UTC (the "
                f"{self.opts.days} days before today), {s['fraud_rows']:,} fraud rows in {s['chains']:,} attack "
                f"chains -> {self.history_path}")

    def _snapshots(self) -> str:
        from batch.engines import dates_between, open_engine, run_snapshots
        from stores.redis_online import OnlineStore

        s = self.settings
        days = dates_between(self.today - dt.timedelta(days=self.opts.days - 1), self.today)
        engine = open_engine("duckdb", offline_dir=s.offline_dir, history=self.history_path, secret=s.entity_secret,
                             allowed_lateness_ms=s.allowed_lateness_ms)
        store = OnlineStore(s.redis)
        try:
            # Earlier nights are offline only (training reads them); today's night is also published online,
            # as the nightly job would have done at midnight, so the story's transactions see it.
            if len(days) > 1:
                run_snapshots(engine, days[:-1], offline_dir=s.offline_dir)
            written = run_snapshots(engine, days[-1:], offline_dir=s.offline_dir, online=store)
        finally:
            engine.close()
            store.close()
        return (f"{len(days)} nightly snapshots of every batch group ({days[0]} .. {days[-1]}, DuckDB) in {s.offline_dir}; "
                f"today's ({written[0][1]:,} cards) also published to Redis")

    def _train(self) -> str:
        from model.registry import METADATA_FILE, current_version, models_dir

        # SPEC section 9's story names no hour: a model that reads the clock would tell it differently by the time of
        # day the demo runs (measured with the hour in the model: at 05:20 UTC two normal purchases scored FRAUD;
        # stamped at 12:00, the attack's second transaction NOT FRAUD). The demo's model does not read the clock.
        child = Child("train", ["train", "--history", str(self.history_path), "--no-event-time"],
                      self.run_dir / "train.log")
        child.start()
        t0 = time.monotonic()
        try:
            with self.out.status("") as status:
                while child.proc.poll() is None:
                    status.update(f"`velocity train` running, {time.monotonic() - t0:.0f} s (its log: {child.log})")
                    time.sleep(0.5)
        except BaseException:  # Ctrl-C: no training left behind
            child.stop()
            raise
        code = child.proc.returncode
        if code != 0:
            self._fail("model", f"`velocity train` exited {code}: {child.tail(3)}", child.log)
        root = models_dir(self.data_dir)
        version = current_version(root)
        if version is None:
            self._fail("model", f"`velocity train` made no model current under {root}", child.log)
        meta = json.loads((root / version / METADATA_FILE).read_text())
        test = meta["metrics"]["model"]["test"]
        base = meta["metrics"]["original_four"]["test"]
        self.model = {"version": version, "dir": root / version, "threshold": float(meta["threshold"]),
                      "rule": meta.get("threshold_rule", {}).get("description", ""), "features": meta["features"],
                      "aucpr": test["aucpr"], "base_aucpr": base["aucpr"], "mlflow": meta.get("mlflow", {})}
        feats = meta["features"]
        names = [f["name"] if isinstance(f, dict) else str(f) for f in feats]
        return (f"model {version} by `velocity train`: test AUC-PR {test['aucpr']:.3f} (the original four features "
                f"and hyperparameters: {base['aucpr']:.3f}); threshold {meta['threshold']:.4f}, its own rule "
                f"({meta.get('threshold_rule', {}).get('rule', '?')} {meta.get('threshold_rule', {}).get('max_fpr', '')}"
                f"); features {', '.join(names)}")

    def _start_children(self) -> str:
        from services.manager import port_open

        s = self.settings
        stopped = stop_remembered(self.demo_root / "running.json")
        for what, port in (("API", self.opts.api_port), ("worker metrics", self.opts.metrics_port)):
            if port_open(port):
                self._fail("worker + API", f"port {port} (the {what}) is in use; stop what uses it or pass "
                           f"--{'api' if what == 'API' else 'metrics'}-port")
        try:
            _start_at_end(s.kafka.bootstrap, s.kafka.topic_transactions, GROUP)
        except Exception as exc:  # e.g. a member of the group still running elsewhere: it reads from its offsets
            self._note(f"could not move group {GROUP} to the end of {s.kafka.topic_transactions}: {exc!r}")
        worker = Child("stream worker", ["stream", "--group", GROUP, "--metrics-port", str(self.opts.metrics_port),
                                         "--archive-roll-s", "1", "--log-level", "info"],
                       self.run_dir / "stream.log")
        api = Child("API", ["serve", "--port", str(self.opts.api_port), "--log-level", "info"],
                    self.run_dir / "api.log")
        self.worker, self.api = worker.start(), api.start()
        self.children = [self.worker, self.api]
        self._stage_log = api.log
        self._wait_api_ready()
        self._stage_log = worker.log
        _wait(lambda: self._alive(self.worker) and _group_members(s.kafka.bootstrap, GROUP) > 0, 120,
              "the stream worker to join its consumer group")
        prev = f"; stopped the previous demo's {', '.join(stopped)}" if stopped else ""
        return (f"stream worker (scoring on, group {GROUP}, pid {self.worker.pid}) and API at {self.api_url} "
                f"(pid {self.api.pid}) ready with model {self.model['version']}{prev}")

    def _alive(self, child: Child) -> bool:
        if not child.alive():
            self._fail(self._current, f"the {child.name} exited ({child.proc.returncode}): {child.tail(3)}",
                       child.log)
        return True

    def _wait_api_ready(self) -> None:
        import httpx

        def ready() -> bool:
            self._alive(self.api)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                r = httpx.get(f"{self.api_url}/readyz", timeout=2)
                body = r.json()
                return (r.status_code == 200 and body["kafka"]["state"] == "connected"
                        and body["model"]["version"] == self.model["version"])
            return False

        _wait(ready, 120, f"the API at {self.api_url} to be ready (model {self.model['version']}, Kafka producer "
              "connected)")

    def _send_story(self) -> str:
        import httpx
        import pyarrow.parquet as pq

        from featurestore.entity import EntityKeyer
        from stores.offline_files import snapshot_path
        from stores.redis_online import OnlineStore

        s = self.settings
        snap = pq.read_table(snapshot_path(s.offline_dir, self.today),
                             columns=["card", "num_trans_last_1w", "avg_amt_last_1w"]).to_pandas()
        hist = self.history.select(["cc_num", "amount", "fraud_label", "merchant", "category"]).to_pandas()
        keyer = EntityKeyer(s.entity_secret)
        unique = hist["cc_num"].unique()
        pans = {keyer(p): p for p in unique}
        key_of = dict(zip(pans.values(), pans.keys(), strict=True))
        fraud = {key_of[p] for p in hist.loc[hist["fraud_label"] == 1, "cc_num"].unique()}
        store = OnlineStore(s.redis)
        now = _now_ms()
        try:
            cards = story.choose_cards(snap, pans, fraud, lambda c: store.read_features(
                c, "", now, None).values["num_trans_last_10m"] == 0)
        finally:
            store.close()
        normal = []
        for c in cards[:story.NORMAL_CARDS]:  # the history is in time order
            own = hist[hist["cc_num"] == c.pan]
            amount = story.normal_amount(c, own["amount"].tolist())
            shop = own[own["amount"] == amount].tail(1)  # where it paid that, else its most frequent merchant
            if shop.empty:
                shop = own.groupby(["merchant", "category"]).size().sort_values().tail(1).reset_index()
            normal.append((amount, str(shop["merchant"].iloc[0]), str(shop["category"].iloc[0])))
        txns = story.plan(cards, self.opts.seed, normal)
        self._note("story cards: " + ", ".join(f"{c.masked} ({c.card[:8]}, {c.num_trans_last_1w}/week, avg "
                                               f"{c.avg_amt_last_1w:.2f})" for c in cards))
        self.outcomes: list[story.Outcome] = []
        scores = _ScoresReader(s.kafka.bootstrap, s.kafka.topic_scores)
        self._stage_log = self.run_dir / "stream.log"
        try:
            with httpx.Client(base_url=self.api_url, timeout=10) as client:
                attack_t0: float | None = None
                attack_base_ms = 0
                for t in txns:
                    ts = _now_ms()
                    if t.phase == "attack":
                        if attack_t0 is None:
                            attack_t0 = time.monotonic()
                            last = txns[-1].offset_ms
                            attack_base_ms = ts if self.opts.realtime else ts - last
                        if self.opts.realtime:
                            delay = attack_t0 + t.offset_ms / 1000 - time.monotonic()
                            if delay > 0:
                                time.sleep(delay)
                            ts = _now_ms()
                        else:
                            ts = attack_base_ms + t.offset_ms
                    r = client.post("/v1/score", json=t.body(ts))
                    if r.status_code != 200:
                        self._fail("story", f"POST /v1/score answered {r.status_code}: {r.text[:300]}",
                                   self.run_dir / "api.log")
                    answer = r.json()
                    if not answer.get("published"):
                        self._fail("story", f"the API could not publish {t.txn_id} to Kafka",
                                   self.run_dir / "api.log")
                    outcome = story.Outcome(t, ts, answer)
                    self.outcomes.append(outcome)
                    # The next transaction is sent once the stream has applied (and scored) this one, so the
                    # endpoint reads a window with everything before it: the counts read 1..10, not lagged.
                    outcome.stream = scores.wait_for(t.txn_id, 90 if len(self.outcomes) == 1 else 30,
                                                     alive=lambda: self._alive(self.worker))
        finally:
            scores.close()
        return (f"{len(txns)} transactions sent to POST /v1/score ({story.NORMAL_CARDS} normal cards, then "
                f"{story.ATTACK_LENGTH} on {cards[-1].masked} "
                f"{'1-2 s apart in real time' if self.opts.realtime else 'stamped 1-2 s apart'}); "
                "each one applied and scored by the stream before the next")

    # ------------------------------------------------------------------------------------------ report

    def _report(self) -> Result:
        from batch.consistency import same_value

        i = 7
        self.out.print(f"[bold][{i}/{len(self.STAGES)}] agreement[/] …", highlight=False)
        self._print_table()
        v = story.verdict(self.outcomes)
        disagreements = []
        for o in self.outcomes:
            if o.stream is None:
                disagreements.append(f"{o.txn.txn_id}: no stream score")
                continue
            for name, value in o.answer["features"].items():
                if not same_value(value, o.stream["features"].get(name)):
                    disagreements.append(f"{o.txn.txn_id}: {name} endpoint {value} vs stream "
                                         f"{o.stream['features'].get(name)}")
            if o.answer["decision"] != o.stream["decision"] or not math.isclose(
                    o.answer["score"], o.stream["score"], rel_tol=1e-6, abs_tol=1e-9):
                disagreements.append(f"{o.txn.txn_id}: score/decision endpoint {o.answer['score']:.6f} "
                                     f"{o.answer['decision']} vs stream {o.stream['score']:.6f} {o.stream['decision']}")
        agree = not disagreements
        n = len(self.outcomes)
        if agree:
            self.out.print(f"      the stream scorer's answers on `{self.settings.kafka.topic_scores}` (source: stream) "
                           f"for the same {n} transactions agree with the endpoint's: every feature equal (1e-9 "
                           "relative), same scores and decisions", highlight=False, soft_wrap=True)
        else:
            self.out.print(f"      [red]the stream and the endpoint disagree on {len(disagreements)} value(s):[/]",
                           highlight=False)
            for d in disagreements[:10]:
                self.out.print(f"        {escape(d)}", highlight=False, soft_wrap=True)
        self._print_verdict(v)
        if self.opts.json_path is not None:
            _write_json(self.opts.json_path, [o.row() for o in self.outcomes])
            self.out.print(f"      table written to {self.opts.json_path} (SPEC section 9's JSON)", highlight=False)
        return Result(self.outcomes, v, agree, disagreements, None, self.model, 1)

    def _print_table(self) -> None:
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
        for col, justify in (("phase", "left"), ("card", "left"), ("amount", "right"),
                             ("num_trans_last_10m", "right"), ("amt_ratio1", "right"), ("amt_ratio2", "right"),
                             ("count_ratio", "right"), ("score", "right"), ("decision", "left"), ("story", "left")):
            table.add_column(col, justify=justify, no_wrap=True)
        for o in self.outcomes:
            r = o.row()
            ok = r["decision"] == o.txn.expected
            table.add_row(r["phase"], r["card"], f"{r['amount']:,.2f}", _cell(r["num_trans_last_10m"]),
                          _cell(r["amt_ratio1"]), _cell(r["amt_ratio2"]), _cell(r["count_ratio"]),
                          f"{r['score']:.4f}", r["decision"],
                          "ok" if ok else f"[red]story: {o.txn.expected}[/]")
        self.out.print(table)

    def _print_verdict(self, v: story.Verdict) -> None:
        thr = self.model["threshold"]
        counts = ", ".join(_cell(c) for c in v.counts[story.NORMAL_CARDS:])
        if v.counts_ok:
            self.out.print(f"      10-minute counts of the attack: {counts} (exactly 1..10)", highlight=False)
        else:
            self.out.print(f"      [red]10-minute counts of the attack: {counts}, not 1..10[/]", highlight=False)
        if v.decisions_ok:
            self.out.print("      decisions as the story says: the three normal cards and the attack's first "
                           "transaction NOT FRAUD, the other nine FRAUD", highlight=False, soft_wrap=True)
            return
        self.out.print(f"      [red]{len(v.wrong)} decision(s) differ from the story[/] (threshold {thr:.4f}, "
                       f"{escape(self.model['rule'])}):", highlight=False, soft_wrap=True)
        for o in v.wrong:
            label = "normal card" if o.txn.phase == "normal" else f"attack #{o.txn.position}"
            self.out.print(f"        {label} on {o.txn.card.masked}: score {o.answer['score']:.4f} "
                           f"{'<' if o.answer['score'] < thr else '>='} threshold -> {o.answer['decision']}; "
                           f"the story says {o.txn.expected}", highlight=False, soft_wrap=True)
        self.out.print("      The model and threshold are `velocity train`'s own, and nothing in training knows the "
                       "story; the README's Demo section explains what decides these rows.", highlight=False,
                       soft_wrap=True)

    def _offline_check(self) -> str:
        from batch.consistency import check

        s = self.settings
        report = check(bootstrap=s.kafka.bootstrap, topic=s.kafka.topic_scores, offline_dir=s.offline_dir,
                       secret=s.entity_secret, allowed_lateness_ms=s.allowed_lateness_ms,
                       since_ms=min(o.ts for o in self.outcomes) - 60_000, txn_ids=[o.txn.txn_id for o in
                                                                                    self.outcomes])
        self._offline_ok = report.ok
        st, api = report.stream, report.api
        text = (f"recomputed offline from the archive and snapshots (the training-set code): stream "
                f"{st.compared} scores, {st.mismatches} mismatches"
                + (f", {len(st.missing)} not archived" if st.missing else "")
                + f"; API {api.compared} answers, agreement {api.agreement:.0%}")
        if not report.ok:
            from batch.consistency_cli import render

            render(report, self.out)
        return text

    def _next_steps(self, r: Result) -> None:
        from model.tracking import settings as tracking_settings

        up = self.opts.keep_running
        tracking = tracking_settings(self.data_dir)
        lines = [
            ("dashboard", f"{self.api_url}/" + ("" if up else "  (after `velocity serve`, or run the demo with "
                                                            "--keep-running)")),
            ("API docs", f"{self.api_url}/docs"),
            ("model report", str(self.model["dir"] / "report.md") + "  (`velocity models list`)"),
            ("MLflow", f"{tracking.ui_command()}  (the UI needs the full mlflow package: README, Model)"),
            ("skew check", "velocity consistency"),
            ("logs", str(self.run_dir)),
        ]
        if up:
            lines.append(("running", f"stream worker pid {self.worker.pid}, API pid {self.api.pid}; stop them with "
                                     f"`kill {self.worker.pid} {self.api.pid}` (the next `velocity demo` stops them too)"))
        self.out.print("[bold]next[/]", highlight=False)
        for name, text in lines:
            self.out.print(f"  {name:<13} {escape(text)}", highlight=False, soft_wrap=True)
        verdict = ("story reproduced" if r.exit_code == 0 else "[red]story NOT reproduced as SPEC section 9 says "
                   "(see above)[/]")
        self.out.print(verdict, highlight=False)

    def _stop_children(self) -> None:
        for c in reversed(self.children):
            c.stop()
        self.children = []


# ------------------------------------------------------------------------------------------------ helpers


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4f}"


def _write_json(path: Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    os.replace(tmp, path)


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.25)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _group_members(bootstrap: str, group: str) -> int:
    """Members of a consumer group once it is Stable (its partitions assigned), else 0."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    except KafkaError:
        return 0
    try:
        info = admin.describe_groups([group]).get(group, {})
        return len(info.get("members") or []) if info.get("group_state") == "Stable" else 0
    except KafkaError:
        return 0
    finally:
        admin.close()


def _start_at_end(bootstrap: str, topic: str, group: str) -> None:
    """Commit the demo group's offsets at the end of `topic`: its worker applies the story and what follows, not
    a backlog other runs left in a shared topic (a new group would otherwise start from the earliest offset)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                             allow_auto_create_topics=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return
        ends = consumer.end_offsets(tps)
        consumer.assign(tps)
        consumer.commit({tp: OffsetAndMetadata(ends[tp], "", -1) for tp in tps})
    finally:
        consumer.close()


class _ScoresReader:
    """Reads the scores topic from its end as of construction, collecting the stream's answers by txn_id."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                      allow_auto_create_topics=False)
        parts = self.consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        self.consumer.assign(tps)
        self.consumer.seek_to_end(*tps)
        for tp in tps:
            self.consumer.position(tp)  # resolve the end offsets now, before anything is sent
        self.seen: dict[str, dict] = {}

    def wait_for(self, txn_id: str, timeout_s: float, alive: Callable[[], bool]) -> dict:
        end = time.monotonic() + timeout_s
        while txn_id not in self.seen:
            if time.monotonic() > end:
                raise TimeoutError(f"the stream worker did not score {txn_id} within {timeout_s:.0f} s")
            alive()
            for msgs in self.consumer.poll(timeout_ms=200).values():
                for m in msgs:
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        rec = json.loads(m.value)
                        if rec.get("source") == "stream":
                            self.seen.setdefault(rec["txn_id"], rec)
        return self.seen[txn_id]

    def close(self) -> None:
        self.consumer.close()
