"""Code specific to one array library or framework (adapters, device policy, fast paths).

``shampoo_core`` itself holds only array-API code; everything that imports torch, JAX, CuPy or
SciPy by name lives here.
"""
