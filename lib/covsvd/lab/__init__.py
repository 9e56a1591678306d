"""The covsvd research lab: what the notebooks, the figures and the ablation sweep are built from.

It imports the core (``covsvd``); the core never imports it. Its extra dependencies (polars, matplotlib, seaborn,
scipy, ipywidgets, nbclient, jupyterlab) are the ``lab`` extra: ``pip install 'covsvd[lab]'``.

Modules: ``task`` (the local retrieval task), ``arms`` / ``rowstore`` / ``stats`` / ``ablate`` (the ablation
sweep), ``task_runs`` (notebook 08's stored training runs), ``sweeps``, ``compress``, ``teaching``, ``whitening``
(notebook helpers), ``explore`` (the widget), ``plotting`` / ``figures`` (figure style and the notebook runner),
``cli`` (the ``figures`` and ``ablate`` verbs).
"""
