# The docs test (CTest label "docs"): builds the `docs` target and fails when Doxygen warned,
# printing each warning: an undocumented public name in include/kvcache, or a documentation
# error. Run as cmake -DBUILD_DIR=<build> -DLOG=<build>/docs/warnings.log -P check_docs.cmake.
#
# Headers whose warnings are reported but not counted (none now; a header being rewritten in a
# parallel branch may be listed here for a while).
set(kvcache_docs_pending)

execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD_DIR} --target docs
                RESULT_VARIABLE build_result)
if(NOT build_result EQUAL 0)
  message(FATAL_ERROR "docs: building the docs target failed (${build_result})")
endif()
if(NOT EXISTS ${LOG})
  message(FATAL_ERROR "docs: Doxygen wrote no warning log at ${LOG}")
endif()

file(STRINGS ${LOG} lines)
set(counted 0)
set(pending 0)
foreach(line IN LISTS lines)
  if(line STREQUAL "")
    continue()
  endif()
  # Doxygen continues a warning on indented lines; they belong to the one before.
  if(line MATCHES "^[ \t]")
    continue()
  endif()
  set(is_pending FALSE)
  foreach(header IN LISTS kvcache_docs_pending)
    string(FIND "${line}" "${header}:" at)
    if(NOT at EQUAL -1)
      set(is_pending TRUE)
    endif()
  endforeach()
  if(is_pending)
    math(EXPR pending "${pending} + 1")
    message(STATUS "pending (not counted): ${line}")
  else()
    math(EXPR counted "${counted} + 1")
    message(STATUS "warning: ${line}")
  endif()
endforeach()

message(STATUS "docs: ${counted} warnings, ${pending} more in headers still to document "
               "(${kvcache_docs_pending})")
if(counted GREATER 0)
  message(FATAL_ERROR "docs: Doxygen reported ${counted} warnings (above): document the public "
                      "API with /// comments")
endif()
