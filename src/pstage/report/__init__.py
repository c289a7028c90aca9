"""Reports: HTML pages, EDA, run report, label audit, the board, console summaries."""
