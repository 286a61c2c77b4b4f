"""fedapp-board: the operator's web board over the event store (fedapp/features/events.py).

fedapp-board                              # http://127.0.0.1:8050, runs under ./outputs
fedapp-board --db postgresql+psycopg://fedapp@db/fedapp --root /srv/fedapp/outputs
fedapp-board import outputs/              # import existing run folders
"""
