"""`velocity demo`: the seed's fraud story, end to end on real Kafka and Redis (SPEC section 9)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        json_path: Path = typer.Option(None, "--json", help="Also write the story's table as JSON (SPEC section 9: "
                                       "a list of {phase, card, amount, num_trans_last_10m, amt_ratio1, amt_ratio2, "
                                       "count_ratio, score, decision} in send order)."),
        keep_running: bool = typer.Option(False, "--keep-running", help="Leave the stream worker and the API "
                                          "(with its dashboard) running afterwards; the next demo stops them."),
        cards: int = typer.Option(5_000, min=100, help="Cards in the generated history (more: a better model, "
                                  "longer training)."),
        days: int = typer.Option(28, min=10, help="Days of history, ending at today's midnight (UTC), so today's "
                                 "nightly snapshot covers its last week."),
        seed: int = typer.Option(7, help="Seed of the history and of the attack's amounts and gaps."),
        realtime: bool = typer.Option(True, "--realtime/--no-realtime", help="Send the attack 1-2 s apart in real "
                                      "time (~15 s), or stamp its event times 1-2 s apart and send at once."),
        api_port: int = typer.Option(8000, help="Port of the API (and dashboard) the demo starts."),
        metrics_port: int = typer.Option(9469, help="Prometheus port of the demo's stream worker."),
    ) -> None:
        """Run the product end to end and tell the original system's fraud story.

        Stages, one progress line each: Kafka and Redis up; a generated history of the days before today; the nightly 1-week snapshots (DuckDB backfill; today's also published to Redis); `velocity train` (its own model and threshold rule: nothing in training knows the story); the stream worker (with scoring) and the API; then the story through POST /v1/score, each transaction published to Kafka so the stream aggregates and scores it too:

        \b
        - three normal cards, one purchase each (amounts 100-5,000): NOT FRAUD;
        - an attack of 10 transactions 1-2 s apart, amounts 1-50, on a fourth card: the first NOT FRAUD, the other nine FRAUD; 10-minute counts exactly 1..10.

        The four cards are ordinary cards of the history chosen by a stated rule (demo/story.py, README). It prints the table, checks that the stream scorer's answers on `scores` for the same transactions equal the endpoint's, recomputes them offline (as `velocity consistency` does), and says where to look next. Exit status 0 when all of that holds, 1 when the story does not come out as SPEC section 9 says (it says what differs), 2 when a stage fails (it names the stage and the log to read).

        Data goes to $VELOCITY_DATA_DIR (history under demo/, offline store, models, MLflow); logs to $VELOCITY_RUN_DIR/demo/<time>/. Topics and the Redis key prefix are the configured ones.
        """
        from demo.runner import Demo as DemoRun
        from demo.runner import DemoFailed, DemoOptions

        opts = DemoOptions(cards=cards, days=days, seed=seed, json_path=json_path, keep_running=keep_running,
                           realtime=realtime, api_port=api_port, metrics_port=metrics_port)
        try:
            result = DemoRun(opts, console=out).run()
        except DemoFailed as exc:
            err.print(f"[red]velocity demo failed at stage '{escape(exc.stage)}':[/] {escape(exc.message)}",
                      soft_wrap=True, highlight=False)
            err.print(f"read {exc.log_file}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        raise typer.Exit(result.exit_code)
