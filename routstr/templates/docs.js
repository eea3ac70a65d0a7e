function tryIt(id, method, path){
  var f=document.getElementById(id), out=f.querySelector('pre.out');
  var p=path.replace(/\{([^}]+)\}/g,function(_,n){var i=f.querySelector('[name="p_'+n+'"]');
    return encodeURIComponent(i?i.value:'');});
  var q=f.querySelector('[name=query]').value; if(q){p+=(q[0]=='?'?'':'?')+q;}
  var h={'X-Routstr-Version':'v1'}, k=document.getElementById('key').value;
  if(k){h['Authorization']='Bearer '+k;}
  var b=f.querySelector('[name=body]'), o={method:method,headers:h};
  if(b&&b.value.trim()){o.body=b.value;h['Content-Type']='application/json';}
  out.textContent='…';
  fetch(p,o).then(function(r){return r.text().then(function(t){
    try{t=JSON.stringify(JSON.parse(t),null,2);}catch(e){}
    out.textContent=r.status+' '+r.statusText+'\n\n'+t;});})
   .catch(function(e){out.textContent=String(e);});
  return false;
}
