"""harpe-preflight: the checks that catch a silently wrong long-context run before it spends cluster time.

cli.py runs them in order on a reduced twin of the user's run (twin.py); each check is one module that returns a
CheckResult (result.py); report.py writes the stdout table, preflight.md and preflight.json.
"""
