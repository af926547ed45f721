"""Nearest-neighbour distances by brute force in float64 (the Chamfer metric on a GPU; diffmpm_cli/metrics.py launches
it). One thread per query point scans every other point: no distance matrix is stored, and the cost does not depend
on the geometry (a k-d tree degrades where one cloud lies far inside the other). Not differentiated."""

import warp as wp

wp.set_module_options({"enable_backward": False})


@wp.kernel
def nearest_distance(points: wp.array(dtype=wp.vec3d), others: wp.array(dtype=wp.vec3d),
                     out: wp.array(dtype=wp.float64)):
    i = wp.tid()
    p = points[i]
    best = wp.float64(1.0e300)
    for j in range(others.shape[0]):
        d = p - others[j]
        best = wp.min(best, wp.dot(d, d))
    out[i] = wp.sqrt(best)
