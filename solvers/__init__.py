"""Matrix-free solvers on curvature operators (shipped as ``torch_linop.solvers``)."""
