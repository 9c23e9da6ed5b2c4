# Run with cmake -P by packaging.install_layout: fails unless the install prefix holds the public
# headers, the library and the CMake package files a find_package(kvcache) consumer needs.
#   -DPREFIX=<install prefix> -DLIBDIR=<lib dir> -DINCLUDEDIR=<include dir> -DLIBRARY=<file name>
set(package_dir ${PREFIX}/${LIBDIR}/cmake/kvcache)
set(expected
    ${PREFIX}/${INCLUDEDIR}/kvcache/kvcache.hpp
    ${PREFIX}/${INCLUDEDIR}/kvcache/cache/dynamic_cache.hpp
    ${PREFIX}/${INCLUDEDIR}/kvcache/cache/legacy.hpp
    ${PREFIX}/${LIBDIR}/${LIBRARY}
    ${package_dir}/kvcacheConfig.cmake
    ${package_dir}/kvcacheConfigVersion.cmake
    ${package_dir}/kvcacheTargets.cmake)
set(missing "")
foreach(file IN LISTS expected)
  if(NOT EXISTS ${file})
    list(APPEND missing ${file})
  endif()
endforeach()
file(GLOB per_config ${package_dir}/kvcacheTargets-*.cmake)
if(NOT per_config)
  list(APPEND missing "${package_dir}/kvcacheTargets-<config>.cmake")
endif()
if(missing)
  list(JOIN missing "\n  " missing)
  message(FATAL_ERROR "missing from the install prefix:\n  ${missing}")
endif()
message(STATUS "install prefix ${PREFIX} holds headers, ${LIBRARY} and the package files")
