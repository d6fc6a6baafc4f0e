"""The training job: ``gossipgrad train`` (``cli``) and ``python -m gossipgrad.train`` (``worker``).

Options (``config``), the embedded datasets and models (``data``, ``models``, ``plugins``), the
loop (``worker``), metrics and the progress bar (``metrics``), held-out evaluation
(``evaluation``), what a restart carries (``run_state``) and the end-of-run report (``report``).
It builds on the library core (``gossipgrad``) and needs the ``train`` extra:
``pip install 'gossipgrad[train]'``. Nothing is imported here, so ``--help`` stays fast.
"""
