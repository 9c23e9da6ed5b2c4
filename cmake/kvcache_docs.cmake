# The API reference: a `docs` target running Doxygen over include/kvcache (docs/Doxyfile.in) into
# <build>/docs/html, made only where Doxygen is found (Debian's doxygen package; not needed to
# build or use the library). With the tests, a CTest labelled "docs" builds it and fails on any
# warning, so every public name keeps its `///` comment (cmake/check_docs.cmake).
find_package(Doxygen QUIET)
if(NOT DOXYGEN_FOUND)
  message(STATUS "kvcache: Doxygen not found, no docs target (install doxygen for the API reference)")
  return()
endif()

set(KVCACHE_DOCS_DIR ${CMAKE_CURRENT_BINARY_DIR}/docs)
configure_file(${CMAKE_CURRENT_LIST_DIR}/../docs/Doxyfile.in ${KVCACHE_DOCS_DIR}/Doxyfile @ONLY)
file(GLOB_RECURSE kvcache_public_headers CONFIGURE_DEPENDS
     ${PROJECT_SOURCE_DIR}/include/kvcache/*.hpp)
add_custom_command(
  OUTPUT ${KVCACHE_DOCS_DIR}/html/index.html
  # The log is rewritten on every run, so the warnings it holds are this run's.
  COMMAND ${CMAKE_COMMAND} -E remove -f ${KVCACHE_DOCS_DIR}/warnings.log
  COMMAND Doxygen::doxygen ${KVCACHE_DOCS_DIR}/Doxyfile
  DEPENDS ${kvcache_public_headers} ${KVCACHE_DOCS_DIR}/Doxyfile ${PROJECT_SOURCE_DIR}/docs/api.md
  WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
  COMMENT "kvcache: API reference (Doxygen) in ${KVCACHE_DOCS_DIR}/html"
  VERBATIM)
add_custom_target(docs DEPENDS ${KVCACHE_DOCS_DIR}/html/index.html)

if(KVCACHE_BUILD_TESTS)
  add_test(NAME docs.api_reference_has_no_warnings
           COMMAND ${CMAKE_COMMAND} -DBUILD_DIR=${CMAKE_BINARY_DIR}
                   -DLOG=${KVCACHE_DOCS_DIR}/warnings.log -P ${CMAKE_CURRENT_LIST_DIR}/check_docs.cmake)
  set_tests_properties(docs.api_reference_has_no_warnings PROPERTIES LABELS docs)
endif()
