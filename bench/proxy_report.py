"""Turns bench/proxy.sh's raw lines into bench/results/proxy.{json,md}."""
import json
import sys

rows = []
for line in open(sys.argv[1]):
    kind, proxy, conns, rest = line.rstrip("\n").split(" ", 3)
    if kind == "http":
        rps, p99, non2xx, rest2 = rest.split(" ", 3)
        sock, rss = rest2.rsplit("|", 1)
        rows.append(dict(kind="plain HTTP (wrk, keep-alive)", proxy=proxy, connections=int(conns),
                         rps=float(rps), p99_ms=float(p99), errors=int(non2xx),
                         error_detail=sock.strip("| "), rss_mib=round(int(rss) / 1024, 1)))
    else:
        j, rss = rest.rsplit("} ", 1)
        d = json.loads(j + "}")
        rows.append(dict(kind="CONNECT + TLS + GET", proxy=proxy, connections=int(conns),
                         rps=d["rps"], p99_ms=d["p99_ms"], errors=d["errors"],
                         error_detail=d["first_error"], rss_mib=round(int(rss) / 1024, 1)))
json.dump(rows, open("bench/results/proxy.json", "w"), indent=1)
with open("bench/results/proxy.md", "w") as f:
    f.write("| load | connections | proxy | requests/s | p99 [ms] | errors | RSS after [MiB] |\n")
    f.write("|:---|---:|:---|---:|---:|---:|---:|\n")
    for r in rows:
        f.write("| {kind} | {connections} | {proxy} | {rps:.0f} | {p99_ms:.2f} | {errors} | {rss_mib} |\n".format(**r))
print(open("bench/results/proxy.md").read())
for r in rows:
    if r["error_detail"]:
        print(f"{r['proxy']} {r['kind']} {r['connections']}: {r['error_detail']}")
