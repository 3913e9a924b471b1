"""A Tk window on foliosync: a watchlist's symbols with their prices, a freshness badge, an entry.

python examples/tk_watchlist.py [REPLICA] (FOLIOSYNC_SERVER and FOLIOSYNC_TOKEN to sync; offline
without). FOLIOSYNC_EXAMPLE_SECONDS=N closes it after N seconds; it prints its rows on the way out.
"""

import os
import sys
import tkinter as tk

from foliosync.client import BackgroundClient
from foliosync.sync.errors import FolioSyncError

root = tk.Tk()
root.title("Tech")
server, token = os.environ.get("FOLIOSYNC_SERVER"), os.environ.get("FOLIOSYNC_TOKEN")
# Callbacks come from foliosync's thread: root.after(0, fn) runs them in Tk's.
path = sys.argv[1] if len(sys.argv) > 1 else "replica.db"
client = BackgroundClient.open(path, server, token, dispatcher=lambda fn: root.after(0, fn))
if "Tech" not in [d.name for d in client.documents()]:
    client.create_watchlist("Tech")
badge, rows, entry = tk.Label(root), tk.Listbox(root, width=50), tk.Entry(root)
for widget in (badge, rows, entry):
    widget.pack(fill="x")


def refresh(*_: object) -> None:
    watchlist = client.watchlist("Tech")  # a snapshot: plain values, safe to keep
    badge["text"] = watchlist.freshness.describe()
    quotes = client.quotes(watchlist.symbols)
    rows.delete(0, tk.END)
    for symbol in watchlist.symbols:
        q = quotes.get(symbol)
        rows.insert(tk.END, f"{symbol}  {q.price} ({q.freshness().level})" if q else symbol)


def add(_: object) -> None:
    try:
        client.add_symbols("Tech", entry.get())
        entry.delete(0, tk.END)
    except FolioSyncError as exc:  # an invalid symbol, say
        badge["text"] = str(exc)


entry.bind("<Return>", add)
for subscribe in (client.on_change, client.on_prices, client.on_freshness, client.on_connection):
    subscribe(refresh)
refresh()
root.protocol("WM_DELETE_WINDOW", root.quit)
if seconds := os.environ.get("FOLIOSYNC_EXAMPLE_SECONDS"):
    root.after(int(float(seconds) * 1000), root.quit)
root.mainloop()
print(badge["text"], *rows.get(0, tk.END), sep="\n")
client.close()  # pending changes get a moment to reach the relay; none is lost either way
root.destroy()
