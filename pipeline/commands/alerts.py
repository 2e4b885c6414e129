"""``skydiff alerts publish|show|tail|replay``: publish subtraction products' alerts, inspect
packets, read a topic, republish the spool."""
from __future__ import annotations

import logging
import uuid

from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRY, EXIT_USAGE

log = logging.getLogger("skydiff.alerts")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("alerts", parents=[common], help="publish, inspect, tail and replay alert packets",
                              description="Alert packets (ZTF schema v4.02): publish those of subtraction "
                                          "outputs, show one, tail a Kafka topic, or republish what the spool "
                                          "still holds.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    publish = actions.add_parser("publish", parents=[common], help="build and publish the alerts of "
                                 "subtraction output folders (spool first, then the broker)")
    publish.add_argument("outdirs", nargs="+", metavar="OUTDIR", help="a `skydiff subtract` output folder")
    publish.add_argument("--bootstrap", metavar="HOST:PORT", help="broker (default: kafka.bootstrap_servers; "
                         "none: packets stay in the spool)")
    publish.add_argument("--spool", metavar="DIR", help="spool folder (default: paths.spool)")
    publish.add_argument("--history", metavar="FILE", help="object history in this SQLite file (default: the "
                         "[history] configuration: history.url, else paths.history)")
    publish.set_defaults(func=run_publish)

    show = actions.add_parser("show", parents=[common], help="summarise an .avro packet, optionally as a PNG")
    show.add_argument("file", metavar="FILE.avro", help="an alert packet (ours or ZTF's)")
    show.add_argument("--png", metavar="OUT.png", help="write the science/reference/difference triplet")
    show.set_defaults(func=run_show)

    tail = actions.add_parser("tail", parents=[common], help="consume a topic, one line per alert")
    tail.add_argument("--bootstrap", metavar="HOST:PORT", help="broker (default: kafka.bootstrap_servers)")
    tail.add_argument("--topic", required=True, action="append", help="topic (repeatable)")
    tail.add_argument("--group", help="consumer group (default: a fresh one, reading from the start)")
    tail.add_argument("--max", type=int, help="stop after N alerts")
    tail.add_argument("--timeout", type=float, default=30.0, help="stop after S seconds (default 30)")
    tail.set_defaults(func=run_tail)

    replay = actions.add_parser("replay", parents=[common], help="republish undelivered packets from the spool")
    replay.add_argument("--spool", metavar="DIR", help="spool folder (default: paths.spool)")
    replay.add_argument("--bootstrap", metavar="HOST:PORT", help="broker (default: kafka.bootstrap_servers)")
    replay.set_defaults(func=run_replay)


def run_publish(args) -> int:
    """Alerts of each OUTDIR, earliest exposure first; 0 done (with no broker: spooled), 75 some
    packets still await the broker (``alerts replay`` sends them), 3 bad products."""
    import dataclasses

    from alerts.from_subtraction import publish_products
    from alerts.history import SQLiteHistoryStore, open_history_store
    from alerts.publish import AlertPublisher
    from alerts.spool import PENDING, Spool
    from pipeline.core.config import check_bootstrap_servers
    cfg = args.cfg
    kafka = cfg.kafka if not args.bootstrap else dataclasses.replace(
        cfg.kafka, bootstrap_servers=check_bootstrap_servers(args.bootstrap, "--bootstrap"))
    spool = Spool(args.spool or cfg.paths.resolve("spool"))
    # Bad products (3) and a producer that cannot be used (1) end in pipeline.cli.run_command.
    store = SQLiteHistoryStore(args.history, survey=kafka.survey) if args.history else \
        open_history_store(cfg.history, cfg.paths.resolve("history"), kafka.survey)
    with store, AlertPublisher(kafka, spool) as publisher:
        images = publish_products(args.outdirs, cfg, store, publisher)
        publisher.flush()
        report = publisher.report
    for image in images:
        print(f"{image.outdir}: expid {image.expid} rcid {image.rcid} -> {image.topic}: {image.alerts} alert(s), "
              f"{image.spooled} spooled, {image.already_delivered} already delivered "
              f"(build {image.build_s:.2f} s, serialise+publish {image.publish_s:.2f} s)")
    pending = spool.count(PENDING)
    target = kafka.bootstrap_servers or "no broker configured: packets stay in the spool"
    shortfall = f" (not acknowledged: {report.not_acknowledged}: {report.shortfall()})" \
        if kafka.bootstrap_servers and report.not_acknowledged else ""
    print(f"alerts: {sum(i.alerts for i in images)} built from {len(images)} image(s); {report}{shortfall}; "
          f"spool {spool.root} pending {pending} ({target})")
    return EXIT_RETRY if kafka.bootstrap_servers and pending else EXIT_OK


def run_show(args) -> int:
    from alerts.inspect import alert_summary, plot_triplet
    from alerts.schema import AlertFormatError, read_alert_file
    try:
        alert = read_alert_file(args.file)
        print(alert_summary(alert))
        if args.png:
            print(f"cutouts    written to {plot_triplet(alert, args.png)}")
    except (AlertFormatError, ValueError, KeyError) as exc:
        # Also fastavro's and the plot's own errors on a packet that is not one of ours.
        log.error("%s: %s", args.file, exc)
        return EXIT_BAD_INPUT
    return EXIT_OK


def run_tail(args) -> int:
    from alerts.consume import consume_alerts, consumer_config
    from alerts.inspect import alert_line
    from pipeline.core.config import check_bootstrap_servers
    bootstrap = check_bootstrap_servers(args.bootstrap or args.cfg.kafka.bootstrap_servers, "--bootstrap")
    if not bootstrap:
        log.error("no broker: give --bootstrap or set kafka.bootstrap_servers")
        return EXIT_USAGE
    conf = consumer_config(bootstrap, args.group or f"skydiff-tail-{uuid.uuid4().hex[:8]}", args.cfg.kafka)
    count = 0
    for _, alert in consume_alerts(conf, args.topic, max_messages=args.max, timeout_s=args.timeout):
        print(alert_line(alert), flush=True)
        count += 1
    log.info("%d alert(s) read from %s", count, ", ".join(args.topic))
    return EXIT_OK


def run_replay(args) -> int:
    import dataclasses

    from alerts.publish import AlertPublisher, replay
    from alerts.spool import DELIVERED, OVERSIZE, PENDING, Spool
    from pipeline.core.config import check_bootstrap_servers
    kafka = args.cfg.kafka
    if args.bootstrap:
        kafka = dataclasses.replace(kafka, bootstrap_servers=check_bootstrap_servers(args.bootstrap, "--bootstrap"))
    spool = Spool(args.spool or args.cfg.paths.resolve("spool"))
    if not kafka.bootstrap_servers:
        log.error("no broker: give --bootstrap or set kafka.bootstrap_servers; %d packet(s) stay pending",
                  spool.count(PENDING))
        return EXIT_USAGE
    with AlertPublisher(kafka, spool) as publisher:
        report = replay(spool, publisher)
    print(f"replay: {report}")
    print(f"spool {spool.root}: pending {spool.count(PENDING)}, delivered {spool.count(DELIVERED)}, "
          f"oversize {spool.count(OVERSIZE)}")
    return EXIT_OK if spool.count(PENDING) == 0 else EXIT_RETRY
