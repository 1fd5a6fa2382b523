"""The measuring kit of Async Workers Lab: everything lab.py does not need to teach.

lab.py is the app a reader copies: setups, servers, views, routes, Django's settings and one
launcher per server. It runs alone. When this package sits beside it, lab.py also uses it for
what makes a measurement clean and a run safe, and run_all.sh, report.py, the tests and the
benches read the plan from it. One module per concern:

    plan        the models, the scenarios, the article's figures and `lab.py --list`
    postgres    the embedded PostgreSQL: template cache, root without chmod outside its
                folders, owner notes and clean-up after kill -9, a watcher that restarts it
    warm        first-use costs out of the timed requests: idle connections, a warm-up request
    monitor     naming what blocks an event loop (gevent's hub, asyncio's loop)
    sampler     the connections a lab holds, from pg_stat_activity
    checks      ports, URLs, databases, machine limits: every mistake before anything starts
    procs       signals, /proc and parent death: one copy for the lab and for run_all
    run         the orchestrator behind ./run_all.sh
"""
