"""Compare a kosoku (Autobahn|Testsuite) report with the committed expected results.

    python compare.py expected-results.json reports/index.json          # check
    python compare.py expected-results.json reports/index.json --update # rewrite the expected file

The report's index.json is `{agent: {case: {behavior, behaviorClose, remoteCloseCode, duration,
reportfile}}}`; the agent name is the server's address, so it is dropped, and so are `duration`
and `reportfile`, which change from run to run (tungstenite compares its runs the same way).
Any case whose verdicts differ from the expected file, or that is missing or extra, fails the
run, and every expected verdict must itself be a pass (OK, NON-STRICT or INFORMATIONAL).
"""

import collections
import json
import sys

PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}
KEYS = ("behavior", "behaviorClose", "remoteCloseCode")


def case_key(case_id):
    return tuple(int(p) for p in case_id.split("."))


def load_report(path):
    with open(path) as f:
        index = json.load(f)
    if len(index) != 1:
        sys.exit(f"{path}: expected results for one agent, got {sorted(index)}")
    (cases,) = index.values()
    return {cid: {k: r.get(k) for k in KEYS} for cid, r in cases.items()}


def summary(cases):
    groups = collections.defaultdict(collections.Counter)
    for cid, r in cases.items():
        verdict = r["behavior"] if r["behaviorClose"] in PASSING else f"{r['behavior']}/close {r['behaviorClose']}"
        groups[cid.split(".")[0]][verdict] += 1
    for g in sorted(groups, key=int):
        counts = ", ".join(f"{n} {v}" for v, n in sorted(groups[g].items()))
        print(f"  group {g:>2}: {sum(groups[g].values()):>3} cases: {counts}")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 2:
        sys.exit(__doc__)
    expected_path, report_path = args
    got = load_report(report_path)
    print(f"kosoku: {len(got)} cases")
    summary(got)
    if "--update" in sys.argv:
        with open(expected_path, "w") as f:
            json.dump(dict(sorted(got.items(), key=lambda kv: case_key(kv[0]))), f, indent=2)
            f.write("\n")
        print(f"wrote {expected_path}")
        return
    with open(expected_path) as f:
        expected = json.load(f)
    problems = []
    for cid in sorted(set(expected) | set(got), key=case_key):
        e, g = expected.get(cid), got.get(cid)
        if e is None:
            problems.append(f"{cid}: not in the expected results: {g}")
        elif g is None:
            problems.append(f"{cid}: did not run (expected {e})")
        elif e != g:
            problems.append(f"{cid}: expected {e}, got {g}")
        if e is not None and not (e["behavior"] in PASSING and e["behaviorClose"] in PASSING):
            problems.append(f"{cid}: the expected result is itself a failure: {e}")
    if problems:
        print(f"{len(problems)} differences from {expected_path}:")
        for p in problems:
            print(f"  {p}")
        sys.exit(1)
    print(f"all {len(got)} cases match {expected_path}")


if __name__ == "__main__":
    main()
