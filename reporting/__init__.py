"""The run report: one self-contained HTML page of a run (or several runs overlaid) read from its artifacts.

    reporting.data     what the page shows, read from the artifacts of a run's lineage (nothing recomputed)
    reporting.figures  the plots (matplotlib, Agg, no pyplot: stages may run in threads), as PNG bytes
    reporting.page     the sections and the HTML around them (images inline as data: URIs, no network)

Kept apart from ``golf`` so that the compliance stage can write the page into its own artifact (stages never
import golf); ``golf report`` adds what needs the whole store (several runs, the Welch test).
"""
