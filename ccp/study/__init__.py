"""The human preference study behind Table 1's "Pref." column: design, database, web app, analysis.

`ccp-study serve` runs the rating app (`ccp.study.app`) over a SQLite database (`ccp.study.store`)
planned from the design (`ccp.study.design`); `ccp-study analyze` gives win rates and
Bradley–Terry scores (`ccp.study.analysis`). See docs/study.md.
"""
