//! weft injector (stub while dependencies build).
