# Run with cmake -P by packaging.cuda_component_unavailable (a build without the CUDA backend):
# configures the find_package consumer asking for the cuda component and fails unless that
# configure fails with kvcacheConfig.cmake's reason.
#   -DSOURCE=<consumer source dir> -DBINARY=<its build dir> -DPREFIX=<install prefix>
#   -DCXX=<C++ compiler>
execute_process(
  COMMAND ${CMAKE_COMMAND} -S ${SOURCE} -B ${BINARY} -DCMAKE_CXX_COMPILER=${CXX}
          -DCMAKE_PREFIX_PATH=${PREFIX} -DKVCACHE_EXPECTED_PREFIX=${PREFIX} -DKVCACHE_WANT_CUDA=ON
  RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE output)
if(result EQUAL 0)
  message(FATAL_ERROR "find_package(kvcache COMPONENTS cuda) configured against a build without "
                      "the CUDA backend:\n${output}")
endif()
# CMake wraps the lines of its messages, so the output is compared with its white space folded.
string(REGEX REPLACE "[ \t\r\n]+" " " folded "${output}")
foreach(expected "kvcache_FOUND to FALSE" "built without the CUDA backend")
  string(FIND "${folded}" "${expected}" position)
  if(position EQUAL -1)
    message(FATAL_ERROR "the configure failed, but its output does not say \"${expected}\":\n${output}")
  endif()
endforeach()
message(STATUS "find_package(kvcache COMPONENTS cuda) failed as it should:\n${output}")
